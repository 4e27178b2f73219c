"""What a run's accepted samples prove about their timing (Sample.timing), and whether that
is enough for the cost model the profile is for.

The runner adds every OK sample it accepts (measured now or resumed from the store) and,
at the end of a run that otherwise succeeded, asks for the verdict:

- provenance: "timing.<kind>" = how many OK samples have that timing (every kind seen),
  and for streamed samples whose chunks carried several tokens "timing.stream_chunks.chunks"
  = the range of chunks per sample and the output lengths they carried
  ("2-20 chunks per 32 tokens"); recorded whatever the verdict.
- the profile is INVALID (TIMING_EVIDENCE_INSUFFICIENT) when the fit samples (OK, not held
  out) cannot identify runtime(p, o) = alpha(p) + sum beta(p + i): none has per-step decode
  times, not all have a measured prefill (prefill_ns > 0: 0 is "unknown"), and the totals
  alone do not separate alpha from beta, i.e. the grid has fewer than two output lengths or
  fewer than two prompt lengths (`core.costmodel.fit`: a totals-only fit regresses the
  totals on one alpha per prompt size and the decode sums, which needs both to vary).
  INVALID, not FAILED: the run finished and its samples are stored as measured, but they
  are not an idealized result (the design's meaning of INVALID).

Counting is O(1) per sample (a few counters and two small sets): a run does not keep its
samples for this.
"""

from __future__ import annotations

import collections
import dataclasses

from idealrt.core.domain import Sample, SampleFlag, SampleTiming
from idealrt.services.profiler.reasons import TIMING_EVIDENCE_INSUFFICIENT

__all__ = ["TimingEvidence"]


@dataclasses.dataclass
class TimingEvidence:
    """Tallies of the OK samples a run accepted."""

    tokenizer: str = ""  # the profile's tokenizer (HTTP targets), named in the message
    by_timing: collections.Counter[SampleTiming] = dataclasses.field(
        default_factory=collections.Counter
    )
    fit_samples: int = 0
    fit_with_steps: int = 0  # fit samples with per-step decode times
    fit_with_prefill: int = 0  # fit samples with a measured prefill (prefill_ns > 0)
    fit_prompts: set[int] = dataclasses.field(default_factory=set)
    fit_outputs: set[int] = dataclasses.field(default_factory=set)
    # streamed samples whose chunks did not carry one token each
    chunked: int = 0
    chunks_min: int = 0
    chunks_max: int = 0
    chunked_outputs: set[int] = dataclasses.field(default_factory=set)

    def add(self, s: Sample) -> None:
        """Count `s` if it is OK (anything else is not what a fit uses)."""
        if s.flag is not SampleFlag.OK:
            return
        self.by_timing[s.timing] += 1
        if s.timing is SampleTiming.STREAM_CHUNKS:
            self.chunks_min = min(self.chunks_min, s.chunks) if self.chunked else s.chunks
            self.chunks_max = max(self.chunks_max, s.chunks)
            self.chunked += 1
            self.chunked_outputs.add(s.output_tokens)
        if s.heldout:
            return
        self.fit_samples += 1
        self.fit_with_steps += bool(s.timing.has_steps and s.decode_ns)
        self.fit_with_prefill += s.prefill_ns > 0
        self.fit_prompts.add(s.prompt_tokens)
        self.fit_outputs.add(s.output_tokens)

    def provenance(self) -> dict[str, str]:
        entries = {f"timing.{t.value}": str(n) for t, n in sorted(self.by_timing.items())}
        if self.chunked:
            entries["timing.stream_chunks.chunks"] = self._chunks_text()
        return entries

    def _chunks_text(self) -> str:
        outputs = sorted(self.chunked_outputs)
        tokens = "/".join(map(str, outputs[:5])) + ("/..." if len(outputs) > 5 else "")
        return f"{self.chunks_min}-{self.chunks_max} chunks per {tokens} tokens"

    def insufficient(self) -> str:
        """ "" when the fit samples can identify the cost model, else the profile's error:
        "TIMING_EVIDENCE_INSUFFICIENT: <the evidence>"."""
        if not self.fit_samples or self.fit_with_steps:
            return ""
        if self.fit_with_prefill == self.fit_samples:
            return ""  # alpha from the prefill times, beta from total - prefill
        lacking = []
        if len(self.fit_outputs) < 2:
            lacking.append(f"one output length ({_one(self.fit_outputs)})")
        if len(self.fit_prompts) < 2:
            lacking.append(f"one prompt length ({_one(self.fit_prompts)})")
        if not lacking:
            return ""  # totals at >= 2 x 2 sizes separate alpha from beta
        ok = sum(self.by_timing.values())
        parts = []
        if self.chunked:
            by = f"tokenizer {self.tokenizer} counted" if self.tokenizer else "with"
            parts.append(
                f"{self.chunked} of {ok} samples have stream chunks of several tokens "
                f"({by} {self._chunks_text()})"
            )
        totals = self.by_timing[SampleTiming.TOTALS_ONLY]
        if totals:
            parts.append(f"{totals} of {ok} samples have the request total only")
        parts.append("no sample has per-step decode times")
        missing = self.fit_samples - self.fit_with_prefill
        parts.append(f"{missing} of {self.fit_samples} fit samples have no measured prefill")
        parts.append("the grid has " + " and ".join(lacking))
        return (
            f"{TIMING_EVIDENCE_INSUFFICIENT}: " + "; ".join(parts) + "; the cost model cannot "
            "be fitted from these samples (stream one token per chunk, or measure at least "
            "two prompt and two output lengths)"
        )


def _one(values: set[int]) -> str:
    return str(next(iter(values))) if values else "none"
