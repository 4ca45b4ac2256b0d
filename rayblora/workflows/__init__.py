"""Workflows: the only layer of the library that imports Ray (docs/ARCHITECTURE.md).

:mod:`.runtime` starts or joins Ray; :mod:`.members` trains one member from a config and runs members in
process; :mod:`.coordinator` runs members as concurrent Ray Train runs; :mod:`.train` writes a posterior;
:mod:`.evaluate`, :mod:`.fit`, :mod:`.rounds` and :mod:`.sweeps` are the other end-to-end steps.
"""
