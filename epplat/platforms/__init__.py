"""Built-in platform plugins (cpu, cuda, ascend), registered through entry points."""
