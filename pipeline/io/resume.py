"""A rerun's accounting, beside the output folder's code: which of the job's shards (per variant) this
run answers, which earlier runs' shards it keeps or answers again (their input changed, or
`output.redo_errors`), and the tallies of what the output holds once the run is done."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.config import JobConfig, Variant
from pipeline.io import outputs
from pipeline.io.plan import InputError, InputPlan, Shard
from pipeline.io.tally import Tally

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """A shard answered by one variant (a plain job's only variant is unnamed)."""

    variant: Variant
    shard: Shard

    @property
    def out(self) -> str:
        """Its name below data/ and shards/: `<shard>`, or `variant=<name>/<shard>` in a sweep."""
        return self.variant.folder() + self.shard.id


@dataclass(frozen=True)
class ResumeState:
    """What this run does to the output, decided before any engine starts."""

    items: list[WorkItem]  # every shard of the input, for every variant
    pending: list[WorkItem]  # what this run answers
    changed: set[str]  # done shards answered again (or dropped) because their input file changed
    nothing_to_do: bool  # a complete output, or one whose last run failed for its error records
    last_failure: str | None  # that failure (summary.json), repeated by a run with nothing to do

    @property
    def kept(self) -> int:
        return len(self.items) - len(self.pending)


@dataclass(frozen=True)
class OutputTallies:
    """The output's shards, counted from their tallies once the run is done."""

    written: set[str]  # the shards with records
    total: Tally  # the whole output
    run: Tally  # the shards this run wrote
    by_variant: dict[str, Tally]
    run_by_variant: dict[str, Tally]


def resume_state(config: JobConfig, plan: InputPlan, done: set[str]) -> ResumeState:
    """Compare the planned shards with the ones earlier runs finished (`done`, as outputs.prepare
    returned them); forget those that must be answered again."""
    items = [WorkItem(v, s) for v in config.variants() for s in plan.shards]
    changed = changed_inputs(config, plan, items, done)
    done = done - changed
    if config.output.redo_errors:
        redo = outputs.shards_with_errors(config.output.path, done)
        log.info("answering %d shards with error records again (output.redo_errors)", len(redo))
        outputs.forget(config.output, redo)
        done = done - redo
    pending = [i for i in items if i.out not in done]
    if pending:
        log.info("%d of %d shards to run (%d rows, %d per shard); %d done by earlier runs", len(pending), len(items),
                 sum(i.shard.rows for i in pending), config.output.rows_per_file, len(items) - len(pending))
    last_failure = None if pending else outputs.last_failure(config.output.path)
    nothing_to_do = not pending and (outputs.is_complete(config.output.path) or last_failure is not None)
    return ResumeState(items, pending, changed, nothing_to_do, last_failure)


def output_tallies(config: JobConfig, state: ResumeState, done: set[str]) -> OutputTallies:
    """The tallies of every shard with records, summed: the output's, this run's, per variant."""
    written = outputs.done_shards(config.output) if state.pending else done
    names = [v.name for v in config.variants()]
    total, run = Tally(), Tally()
    by_variant, run_by_variant = {n: Tally() for n in names}, {n: Tally() for n in names}
    ran = {i.out for i in state.pending}
    present = [i for i in state.items if i.out in written]
    for item, tally in zip(present, outputs.read_tallies(config.output.path, [i.out for i in present])):
        total.add(tally)
        by_variant[item.variant.name].add(tally)
        if item.out in ran:
            run.add(tally)
            run_by_variant[item.variant.name].add(tally)
    return OutputTallies(written, total, run, by_variant, run_by_variant)


def changed_inputs(config: JobConfig, plan: InputPlan, items: list[WorkItem], done: set[str]) -> set[str]:
    """Done shards whose input file changed since they were answered (another size or modification
    time), and those of such a file the plan no longer has: forgotten, to be answered again
    (input.when_changed: redo), or an InputError before Ray starts (stop)."""
    if not done:
        return set()
    changed, stale = outputs.changed_shards(config.output.path, done, {i.out: i.shard.source for i in items})
    if not changed and not stale:
        return set()
    files = sorted({i.shard.file.rsplit("/", 1)[-1] for i in items if i.out in changed})
    what = (f"{len(files)} input file{'s' if len(files) != 1 else ''} changed since {len(changed)} of the output's "
            f"shards were answered (size or modification time differ): {', '.join(files[:5])}"
            + (" ..." if len(files) > 5 else ""))
    if config.input.when_changed == "stop":
        raise InputError(f"{what}. Set input.when_changed: redo to answer them again, restore the files, or "
                         "choose a new output.path")
    log.warning("%s; answering them again%s", what,
                f" and dropping {len(stale)} shards of rows those files no longer have" if stale else "")
    outputs.forget(config.output, set(changed) | stale)
    return set(changed) | stale
