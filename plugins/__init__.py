"""archkit's built-in model families, each a plugin registered through the same hook as outside ones."""
