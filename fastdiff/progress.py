"""Progress bars (tqdm), or a no-op stand-in when they are turned off."""

from __future__ import annotations


class NoBar:
    """What ``progress_bar(..., enabled=False)`` returns: accepts the calls, shows nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, desc: str, unit: str, enabled: bool, initial: int = 0):
    """A tqdm bar over ``total`` units (``initial`` already done), or NoBar when disabled."""
    if not enabled:
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
