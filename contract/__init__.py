"""The Redis contract between the adapters and the model worker: keys, jobs, queue, history, replies, feedback."""
