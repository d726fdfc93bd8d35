"""Research drivers: studies that use the library, kept out of it.

``python -m experiments.real_motion`` (``make real-motion``) and ``python -m experiments.curve`` import
:mod:`mgfm`; nothing in ``mgfm/`` imports them (``tests/test_layers.py``). Their findings live in
``docs/experiments.md`` and ``BENCHMARKS.md``.
"""
