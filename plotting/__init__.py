"""The plumbing behind utils.py: safe loading of run folders, grouping of runs,
metric series, a shared figure style, and the figures themselves.

Nothing here imports torch or this project's training code: a run folder is
read from its pickles alone, so the figures can be made on any machine.
"""
