"""Process plumbing shared by every chatbot command: settings, logs, metrics and health, Redis."""
