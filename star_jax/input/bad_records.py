"""Bad records never crash a run: they become `Skipped` sentinels, are dropped, counted per reason and
logged; too large a fraction of them stops the run.

A record that fails validation (`records.REASONS`) is replaced by `Skipped(index, reason, detail)`
in `examples.Prepare`; `SkipBad` drops it and attaches the count to the next good example (`_bad`
[len(REASONS)] int32), so counts survive Grain worker processes and batching; `PipelineIterator`
sums them in the main process (`stats()`, keys `data/...`), logs them, and raises
`records.BadDataError` when more than `config.data.max_bad_fraction` of the records seen (after
`config.data.bad_check_after`) are bad, naming the fraction, the threshold and the reasons.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import grain
import numpy as np

from star_jax import records

MAX_LOGGED = 20  # bad records logged one by one per iterator; later ones only in the periodic summary
LOG_EVERY_S = 60.0


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Sentinel for a bad record: where it came from and why it was skipped."""

    index: int
    reason: str
    detail: str
    needed: int = 0  # too_long: the prompt length the record needs
    limit: int = 0  # too_long: config.data.max_prompt_len


def check_bad_fraction(bad: np.ndarray, seen: int, max_fraction: float, check_after: int, longest=None) -> None:
    """Raises records.BadDataError when sum(bad) / seen > max_fraction (once seen >= check_after).

    bad: [len(records.REASONS)] int, skips per reason; seen: records read (good + bad); longest:
    (needed, limit) of the longest too_long prompt seen, if known (the advice then names the length).
    """
    total = int(np.sum(bad))
    if seen >= max(check_after, 1) and total > max_fraction * seen:
        reasons = {r: int(n) for r, n in zip(records.REASONS, bad) if n}
        raise records.BadDataError(
            f"{total} of {seen} records are bad ({total / seen:.2%}), more than "
            f"config.data.max_bad_fraction={max_fraction:.2%}; by reason: {reasons}. " + _advice(reasons, longest)
        )


def _advice(reasons: dict[str, int], longest) -> str:
    """What to change: a longer prompt limit for too_long records, the data (or the threshold) otherwise."""
    others = "Fix or filter the data (see data/README.md), or raise the threshold."
    too_long = reasons.get("too_long", 0)
    if not too_long:
        return others
    if longest:
        needed, limit = longest
        suggest = -(-needed // 64) * 64
        text = (
            f"{too_long} prompts do not fit config.data.max_prompt_len={limit} (the longest seen needs {needed} "
            f"tokens): raise it, e.g. --config.data.max_prompt_len={suggest}."
        )
    else:
        text = (
            f"{too_long} prompts do not fit config.data.max_prompt_len: raise it "
            "(the log's 'skipped record' lines give each prompt's length)."
        )
    if too_long == sum(reasons.values()):
        return text
    return f"{text} For the other reasons: fix or filter the data (see data/README.md), or raise the threshold."


class _SkipBadIterator(grain.DatasetIterator):
    """Drops `Skipped` sentinels; attaches to the next good example `_bad` [len(REASONS)] int32, the
    skips since the previous one (so counts survive worker processes and batching)."""

    def __init__(self, parent, max_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_fraction, check_after
        self._bad = np.zeros(len(records.REASONS), np.int64)
        self._seen = 0
        self._longest = None  # (needed, limit) of the longest too_long prompt (for the error's advice)

    def __next__(self):
        pending = np.zeros(len(records.REASONS), np.int32)
        while True:
            try:
                example = next(self._parent)
            except StopIteration:
                if pending.any():  # nothing left to carry them: they only reach this log line
                    logging.warning(
                        "data: %d bad records after the last good one at the end of the data", pending.sum()
                    )
                raise
            self._seen += 1
            if not isinstance(example, Skipped):
                return {**example, "_bad": pending}
            pending[records.REASON_INDEX[example.reason]] += 1
            self._bad[records.REASON_INDEX[example.reason]] += 1
            if example.needed > (self._longest or (0,))[0]:
                self._longest = (example.needed, example.limit)
            if self._bad.sum() <= MAX_LOGGED:
                logging.warning("data: skipped record %d (%s): %s", example.index, example.reason, example.detail)
            check_bad_fraction(self._bad, self._seen, self._max_fraction, self._check_after, self._longest)

    def get_state(self):
        return {"parent": self._parent.get_state(), "bad": self._bad.tolist(), "seen": self._seen}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._bad = np.asarray(state["bad"], np.int64)
        self._seen = int(state["seen"])


class SkipBad(grain.IterDataset):
    """IterDataset transform: drops `Skipped` examples and carries their counts (see `_SkipBadIterator`)."""

    def __init__(self, parent, max_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_fraction, check_after

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self._max_fraction, self._check_after)


class PipelineIterator(grain.DatasetIterator):
    """The iterator `pipeline.make_iterator` returns: process-local numpy batches; counts records seen
    and skipped per reason across all workers; checkpointable (`get_state` / `set_state` are JSON)."""

    def __init__(self, parent, *, max_fraction: float, check_after: int, description: str = ""):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_fraction, check_after
        self._description = description
        self._bad = np.zeros(len(records.REASONS), np.int64)
        self._seen = 0
        self._logged_bad, self._last_log = 0, 0.0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        bad = batch.pop("_bad").sum(axis=0)
        self._bad += bad
        self._seen += int(batch[next(iter(batch))].shape[0] + bad.sum())
        total = int(self._bad.sum())
        if total > self._logged_bad and (time.monotonic() - self._last_log > LOG_EVERY_S or not self._logged_bad):
            logging.warning(
                "data%s: skipped %d bad of %d records (%.3f%%): %s",
                self._description,
                total,
                self._seen,
                100 * total / self._seen,
                self._reasons(),
            )
            self._logged_bad, self._last_log = total, time.monotonic()
        check_bad_fraction(self._bad, self._seen, self._max_fraction, self._check_after)
        return batch

    def _reasons(self) -> dict[str, int]:
        return {r: int(n) for r, n in zip(records.REASONS, self._bad) if n}

    def stats(self) -> dict[str, float]:
        """{'data/records_seen', 'data/records_bad', 'data/bad_fraction', 'data/bad/<reason>'...} so far."""
        total = int(self._bad.sum())
        out = {"data/records_seen": float(self._seen), "data/records_bad": float(total)}
        out["data/bad_fraction"] = total / self._seen if self._seen else 0.0
        out |= {f"data/bad/{r}": float(n) for r, n in self._reasons().items()}
        return out

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "bad": self._bad.tolist(), "seen": self._seen}

    def set_state(self, state):
        self._parent.set_state(state["pipeline"])
        self._bad = np.asarray(state["bad"], np.int64)
        self._seen = int(state["seen"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()
