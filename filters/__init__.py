"""Scorers (CLIP, basic, dedup, safety) and selection rules: the score and select stages."""
