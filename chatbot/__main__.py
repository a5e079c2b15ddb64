import sys

from chatbot.main import main

sys.exit(main())
