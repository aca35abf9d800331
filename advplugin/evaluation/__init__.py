"""Evaluation: utility metrics and privacy attacks, one harness for every scheme."""
