"""Captioner backends, prompt templates and caption cleaning: the recaption stage."""
