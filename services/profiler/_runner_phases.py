"""The phases of a profile run: prepare (resume included), warm-ups, the spread schedule,
randomized rounds with contention retries, adaptive prompt sizes and the conclusion; see
the order of work in `idealrt.services.profiler.runner`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from idealrt.core.domain import ProfileState, SampleFlag
from idealrt.core.model_spec import ModelSpec
from idealrt.services.profiler._runner_base import _Cancelled, _RunBase, _Stop
from idealrt.services.profiler.adaptive import AdaptivePlanner, added_prompt_sizes
from idealrt.services.profiler.fingerprint import collect_fingerprint
from idealrt.services.profiler.lease import device_key
from idealrt.services.profiler.plan import (
    Config,
    configurations,
    effective_max_repeats,
    round_order,
    sample_seed,
    total_samples,
    validate_plan,
    warmup_order,
)
from idealrt.services.profiler.schedule import SpreadSchedule, sleep_until
from idealrt.services.profiler.stopping import StopReason

__all__ = ["_RunPhases"]


class _RunPhases(_RunBase):
    # ------------------------------------------------------------ phases

    def _prepare(self) -> tuple[list[Config], dict[Config, list[int]]]:
        spec: ModelSpec | None = self.target.prepare()
        validate_plan(self.profile.plan, spec)
        env = self.target.environment()
        self.monitors = self.opts.monitors(self.profile, env)
        plan = self.profile.plan
        existing = self.sink.all_samples(self.profile.id)
        self.added = added_prompt_sizes(plan, existing)
        configs = configurations(plan, self.added)
        by_key = {(c.prompt_tokens, c.output_tokens, c.heldout): c for c in configs}
        totals: dict[Config, list[int]] = {c: [] for c in configs}
        self.stored = len(existing)
        for s in existing:
            c = by_key.get((s.prompt_tokens, s.output_tokens, s.heldout))
            if c is None:
                continue
            self.detector.seed(c, s)
            if s.flag == SampleFlag.OK:
                totals[c].append(s.total_ns)
            elif s.flag == SampleFlag.NONCONFORMING:
                self.nonconforming += 1
        extra = dict(self.monitors.describe())
        extra["lease.device_key"] = device_key(self.profile.stack.device)
        extra["profile.resumed_samples"] = str(len(existing))
        if self.added:
            extra["profile.resumed_adaptive_sizes"] = ",".join(map(str, self.added))
        if self.monitors.gpu is not None:
            extra["gpu.foreign_processes_at_start"] = str(len(self.monitors.gpu.foreign_pids()))
        provenance = collect_fingerprint(self.profile, spec=spec, target_env=env, extra=extra)
        self._update(
            model_spec=spec or self.profile.model_spec,
            provenance=provenance,
            total_samples=total_samples(plan, len(self.added)),
            completed_samples=sum(len(v) for v in totals.values()),
        )
        self.log.info("profile_prepared", configs=len(configs), resumed=len(existing))
        return configs, totals

    def _warmups(self, configs: list[Config]) -> None:
        plan = self.profile.plan
        for config, w in warmup_order(configs, plan):
            self._check_cancel()
            sample, _ = self._measure(config, w, sample_seed(plan, config, -1 - w))
            if sample.flag == SampleFlag.NONCONFORMING:
                self._nonconforming(config, sample)
            else:
                self.buffer.append(dataclasses.replace(sample, flag=SampleFlag.WARMUP))
            self._flush()

    def _spread_schedule(self, totals: dict[Config, list[int]]) -> SpreadSchedule | None:
        """The schedule of the plan's grid rounds (None without spread, or when the grid is
        done: a resumed adaptive run), anchored now (see schedule.py)."""
        plan = self.profile.plan
        if plan.spread_s <= 0:
            return None
        rounds = effective_max_repeats(plan)
        first = min(len(totals[c]) for c in configurations(plan))
        if first >= rounds:
            return None
        schedule = SpreadSchedule(rounds, plan.spread_s, seed=plan.seed, clock=self.opts.clock)
        if first:
            schedule.begin_at_round(first)
        else:
            schedule.begin()
        entries = dict(self.profile.provenance.entries)
        entries["spread.schedule"] = (
            f"{rounds} rounds over {plan.spread_s:g} s, stratified jitter, seed {plan.seed}"
            + (f"; resumed at round {first}" if first else "")
        )
        self._update(provenance=dataclasses.replace(self.profile.provenance, entries=entries))
        self.log.info("spread_schedule", rounds=rounds, spread_s=plan.spread_s, first=first)
        return schedule

    def _wait_for_round(self, schedule: SpreadSchedule, r: int) -> None:
        """Block until round r is due, on the cancel event (a set event ends the wait at
        once). validate_plan keeps spread_s below budget_s, so no wait outlasts the budget."""
        due = schedule.due(r)
        if not sleep_until(due, self.cancel, clock=self.opts.clock):
            raise _Cancelled
        lag = max(0.0, self.opts.clock() - due)
        self.spread_lag_s = max(self.spread_lag_s, lag)
        self.spread_started += 1
        self.log.info("spread_round_started", round=r, offset_s=schedule.offsets[r], lag_s=lag)

    def _rounds(
        self,
        configs: list[Config],
        totals: dict[Config, list[int]],
        schedule: SpreadSchedule | None = None,
    ) -> StopReason:
        plan, policy, rule = self.profile.plan, self.opts.contention, self.rule
        slots = {c: len(v) for c, v in totals.items()}
        while True:
            pending = rule.pending(totals, slots)
            if not pending:
                return rule.reason(totals)
            r = min(slots[c] for c in pending)
            if schedule is not None and r < schedule.rounds:
                self._wait_for_round(schedule, r)
            queue = collections.deque(
                (c, 0) for c in round_order(configs, plan, r, [c for c in pending if slots[c] == r])
            )
            while queue:
                self._check_cancel()
                if rule.budget_spent():
                    return StopReason.BUDGET
                config, attempt = queue.popleft()
                if attempt and self.cancel.wait(policy.retry_backoff_s * attempt):
                    raise _Cancelled
                sample, wall_ns = self._measure(config, r, sample_seed(plan, config, r, attempt))
                retry = False
                if sample.flag == SampleFlag.NONCONFORMING:
                    self._nonconforming(config, sample)
                    retry = True
                else:
                    verdict = self.detector.judge(config, sample, wall_ns)
                    if verdict.contended:
                        self.log.info(
                            "sample_contended",
                            p=config.prompt_tokens,
                            o=config.output_tokens,
                            repeat=r,
                            attempt=attempt,
                            reasons=list(verdict.reasons),
                        )
                        self.buffer.append(dataclasses.replace(sample, flag=SampleFlag.CONTENDED))
                        retry = True
                    else:
                        self.detector.accept(config, sample)
                        self.buffer.append(sample)
                        totals[config].append(sample.total_ns)
                        slots[config] += 1
                if retry:
                    if attempt < policy.max_retries:
                        queue.append((config, attempt + 1))
                    else:
                        self.abandoned += 1
                        slots[config] += 1
                self._flush()
                self.profile = dataclasses.replace(
                    self.profile, completed_samples=sum(len(v) for v in totals.values())
                )
                self._emit()

    def _adaptive(
        self, configs: list[Config], totals: dict[Config, list[int]], reason: StopReason
    ) -> StopReason:
        """Add prompt sizes until adaptive.py says stop; returns the last rounds' reason."""
        plan = self.profile.plan
        planner = AdaptivePlanner(plan, added=self.added, options=self.opts.adaptive)
        while reason != StopReason.BUDGET:
            self._check_cancel()
            self._flush(force=True)
            samples = self.sink.all_samples(self.profile.id)
            size = planner.next_size(samples, budget_spent=self.rule.budget_spent())
            if size is None:
                break
            assert len(configs) == len(configurations(plan, self.added))
            new = configurations(plan, [*self.added, size])[len(configs) :]
            self.added.append(size)
            configs.extend(new)
            totals.update((c, []) for c in new)
            self._record(planner.provenance(), total_samples=total_samples(plan, len(self.added)))
            self.log.info(
                "adaptive_size_added", p=size, rel_halfwidth=planner.added_rel[-1], added=self.added
            )
            reason = self._rounds(configs, totals)
        changes: dict[str, Any] = {}
        if reason == StopReason.BUDGET:
            planner.halt_budget()
            # configurations of added sizes that the budget left without a sample were
            # optional: dropped (and a size with none left is no longer "added")
            for c in [c for c in configs if c.prompt_tokens in self.added and not totals[c]]:
                configs.remove(c)
                del totals[c]
            kept = {c.prompt_tokens for c in totals}
            planner.drop_unmeasured([p for p in self.added if p not in kept])
            self.added = [p for p in self.added if p in kept]
            changes["total_samples"] = total_samples(plan, len(self.added))
        self._record(planner.provenance(), **changes)
        self.log.info("adaptive_finished", stop=planner.stop, added=self.added)
        return reason

    def _conclude(self, reason: StopReason, totals: dict[Config, list[int]]) -> None:
        rule = self.rule
        entries = dict(self.profile.provenance.entries)
        entries["stopping.reason"] = reason.value
        if self.profile.plan.spread_s > 0:
            entries["spread.rounds_started"] = str(self.spread_started)
            entries["spread.max_lag_s"] = f"{self.spread_lag_s:.6g}"
        worst = rule.worst_ci_rel(totals)
        entries["stopping.worst_ci_rel"] = f"{worst:.6g}"
        entries["contention.measured"] = str(self.detector.measured)
        entries["contention.contended"] = str(self.detector.contended)
        entries["contention.abandoned_repeats"] = str(self.abandoned)
        self.profile = dataclasses.replace(
            self.profile, provenance=dataclasses.replace(self.profile.provenance, entries=entries)
        )
        missing = [c for c, v in totals.items() if not v]
        if self.detector.persistent() or (missing and reason != StopReason.BUDGET):
            evidence = self.detector.evidence(self.abandoned)
            if missing:
                evidence += f"; {len(missing)} configurations have no uncontended sample"
            raise _Stop(ProfileState.INVALID, f"CONTENTION: {evidence}")
        if missing:
            raise _Stop(
                ProfileState.FAILED,
                f"BUDGET_EXHAUSTED: budget_s={self.profile.plan.budget_s} spent with "
                f"{len(missing)} of {len(totals)} configurations unmeasured",
            )
        if reason == StopReason.PRECISION:
            self.profile = dataclasses.replace(
                self.profile, total_samples=self.profile.completed_samples
            )
