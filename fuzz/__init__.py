"""Coverage-guided fuzzing of every loader entry point with atheris: see fuzz/run.py."""
