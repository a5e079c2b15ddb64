"""The `chatbot` command, the top floor: it wires settings, Redis, the model worker (engine/) and the
platform adapters (bot/) into processes. Nothing below imports from here."""
