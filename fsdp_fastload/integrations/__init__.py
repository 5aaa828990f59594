"""Opt-in integrations with training frameworks (imported on demand, never by `import fsdp_fastload`)."""
