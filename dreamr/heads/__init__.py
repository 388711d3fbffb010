"""Verdict heads fitted for the built-in targets, one folder each (``head.safetensors`` + ``head.json``).

Each was made by the ``python -m dreamr.calibrate fit`` command recorded in its ``head.json`` (with its
seed and held-out figures); :func:`dreamr.verify.head.shipped_head_dir` finds them by target name.
"""
