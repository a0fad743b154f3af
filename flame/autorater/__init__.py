"""Autoraters: verdicts from FLAMe-format judges (scoring, rate, evaluate)."""
