"""RecIS's ``recis.hooks`` path: the Trainer's hooks (defined in ``fxrec.framework.hooks``)."""

from fxrec.framework.hooks import HashTableFilterHook, Hook, LoggerHook, ProfilerHook

__all__ = ["HashTableFilterHook", "Hook", "LoggerHook", "ProfilerHook"]
