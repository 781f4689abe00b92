"""What a run's engines cost: engine-seconds, accelerator-seconds (time x the GPUs, or CPU cores, each
engine reserves), tokens per accelerator-hour and, with a price per accelerator-hour
(`cost.price_per_accelerator_hour`), the run's cost and its cost per million input and output tokens.

An engine's time runs from the start of its start-up to its end (or the job's): the time its
accelerators were held for it. A job answered by a standing pool's engines (pool/) is charged its share
of their busy time: each busy moment divided between the jobs with rows in the engine, in proportion
to their rows; the pool's idle time is the pool's (`python -m pipeline engines status`). The actor's own start before that (importing vLLM, about 20 s on CPU)
and the time between a death and the next start-up are not counted.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pipeline.io.tally import Tally
from pipeline.reporting.progress import EngineRun, EngineUse


class Cost(BaseModel):
    accelerator: str = Field("", description="What is counted: `GPU` or `CPU core`.")
    accelerators_per_engine: float = 0.0
    engine_s: float = Field(0.0, description="The engines' time, start-up included.")
    accelerator_s: float = Field(0.0, description="engine_s x accelerators_per_engine.")
    input_tokens: int = Field(0, description="This run's prompt tokens.")
    output_tokens: int = Field(0, description="This run's completion tokens.")
    input_tokens_per_accelerator_hour: float = 0.0
    output_tokens_per_accelerator_hour: float = 0.0
    price_per_accelerator_hour: float | None = None
    currency: str = "USD"
    total: float | None = Field(None, description="accelerator hours x price.")
    per_million_input_tokens: float | None = Field(None, description="total / input tokens in millions.")
    per_million_output_tokens: float | None = Field(None, description="total / output tokens in millions.")

    def render(self) -> str:
        line = (f"{self.accelerator_s / 3600:.4f} {self.accelerator}-hours ({self.engine_s:.0f} engine-s x "
                f"{self.accelerators_per_engine:g}); {self.output_tokens_per_accelerator_hour:,.0f} output tokens "
                f"per {self.accelerator}-hour")
        if self.total is not None:
            line += (f"; {self.total:.6g} {self.currency} ({self.per_million_input_tokens or 0:.6g} per M input, "
                     f"{self.per_million_output_tokens or 0:.6g} per M output tokens)")
        return line


def run_cost(engines: list[EngineUse], per_engine: float, accelerator: str, input_tokens: int,
             output_tokens: int, price: float | None = None, currency: str = "USD") -> Cost:
    engine_s = sum(e.charged_s() for e in engines)
    hours = engine_s * per_engine / 3600
    total = hours * price if price is not None else None
    return Cost(
        accelerator=accelerator, accelerators_per_engine=per_engine, engine_s=round(engine_s, 3),
        accelerator_s=round(engine_s * per_engine, 3), input_tokens=input_tokens, output_tokens=output_tokens,
        input_tokens_per_accelerator_hour=round(input_tokens / hours, 1) if hours else 0.0,
        output_tokens_per_accelerator_hour=round(output_tokens / hours, 1) if hours else 0.0,
        price_per_accelerator_hour=price, currency=currency, total=total,
        per_million_input_tokens=total / (input_tokens / 1e6) if total is not None and input_tokens else None,
        per_million_output_tokens=total / (output_tokens / 1e6) if total is not None and output_tokens else None,
    )


def split_cost(engines: list[EngineUse], busy_s: dict[str, float], tokens: dict[str, tuple[int, int]],
               per_engine: float, accelerator: str, price: float | None = None,
               currency: str = "USD") -> dict[str, Cost]:
    """Per variant of one model (its variants share that model's engines): the engines' time split in
    proportion to the time each variant's shards were being answered (`busy_s`, overlaps once), start-up
    included, so the variants' costs add up to the engines'. `tokens`: variant -> (input, output)."""
    engine_s = sum(e.charged_s() for e in engines)
    whole = sum(busy_s.values())
    costs = {}
    for name, busy in busy_s.items():
        share = busy / whole if whole else 1 / len(busy_s)
        use = EngineUse(engine="share", startup_s=0.0, alive_s=engine_s * share)
        costs[name] = run_cost([use], per_engine, accelerator, *tokens[name], price, currency)
    return costs


def variant_costs(runs: list[EngineRun], groups: list[list[str]], tallies: dict[str, Tally], per_engine: float,
                  accelerator: str, price: float | None, currency: str) -> dict[str, Cost]:
    """Per variant answered in a run: its share of its model's engines' cost. `runs[i]` answered the
    variants `groups[i]` (one model each); `tallies`: what each variant's shards of the run hold."""
    costs: dict[str, Cost] = {}
    for run, names in zip(runs, groups):
        names = sorted(set(names))
        costs.update(split_cost(run.engines, {n: tallies[n].busy_s() for n in names},
                                {n: tallies[n].engine_tokens() for n in names},
                                per_engine, accelerator, price, currency))
    return costs
