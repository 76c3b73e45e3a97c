"""The researcher's shell: :class:`Job`, :class:`Experiment` and :class:`Requests`.

It carries out what the core decides (:mod:`fedsm.core.policy`) and records each decision in
the job's log before acting on it.
"""
