"""`LoadReport`: what `load_into` did, key by key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class Mismatch:
    """A key present on both sides whose shape differs."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "expected": list(self.expected), "found": list(self.found)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Tie:
    """A key the checkpoint lacks that was loaded anyway, through the module's own tie.

    Writers that store shared tensors once (``save_pretrained``, ``safetensors.torch.save_model``)
    drop one name of each tied pair (GPT-2's ``lm_head.weight``, T5's ``embed_tokens``); the
    module shares that tensor with ``to``, which the checkpoint provides.
    """

    key: str
    to: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "to": self.to}


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadReport:
    """The outcome of loading a state into a module.

    Attributes:
        loaded: keys copied into the module.
        missing: keys the module has and the checkpoint lacks (left at their current values).
        unexpected: keys the checkpoint has and the module lacks (ignored).
        mismatched: keys on both sides with different shapes (left untouched when skipped).
        tied: keys the checkpoint lacks that share their tensor, in the module, with a key it
            provides; they hold the loaded values (neither missing nor an error when strict).
        source: the file or reference that was read, when there was one.
        entry: where in the checkpoint the module's state was found (``"model_state_dict"``),
            or ``""`` when the checkpoint is the state dict itself.
        renamed: how the checkpoint's keys were changed to match (rename rules applied,
            wrapper prefixes such as ``module.`` stripped or added), one line each.
    """

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    tied: tuple[Tie, ...] = ()
    source: str | None = None
    entry: str = ""
    renamed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every key matched: nothing missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "entry": self.entry,
            "renamed": list(self.renamed),
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [m.to_dict() for m in self.mismatched],
            "tied": [t.to_dict() for t in self.tied],
        }

    def table(self) -> str:
        """A plain-text table of every key that did not load cleanly, and of the ties.

        Empty when every key of the module was found under its own name in the checkpoint.
        """
        rows = [
            (m.key, "shape mismatch", _shape(m.expected), _shape(m.found)) for m in self.mismatched
        ]
        rows += [(k, "missing", "present", "-") for k in self.missing]
        rows += [(k, "unexpected", "-", "present") for k in self.unexpected]
        rows += [(t.key, "tied", "present", f"through {t.to}") for t in self.tied]
        if not rows:
            return ""
        header = ("key", "problem", "expected (module)", "found (checkpoint)")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"LoadReport: {len(self.loaded)} loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched"
        )
        if self.tied:
            head += f", {len(self.tied)} tied"
        lines = [head, *(f"  keys: {note}" for note in self.renamed)]
        if body := self.table():
            lines.append(body)
        return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
