"""fxrec.framework: training machinery (SPEC §7): the ``Trainer`` and crash-safe checkpoints
(``fxrec.framework.checkpoint``)."""
