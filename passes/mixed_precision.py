"""Mixed precision: Sensitivity measures every layer at every width (fxq.mp.sensitivity); MixedPrecision solves the
bit allocation ILP over them (fxq.mp.plan) and sets each layer's width. Results stay in node.meta, so a sweep
over budgets measures once."""

from __future__ import annotations

from torch.fx import GraphModule

from fxq.config import LossWeights, MixedPrecisionConfig
from fxq.dist.world import World
from fxq.errors import GraphCheckFailed, UnsupportedOp
from fxq.ir.graph import call_sites
from fxq.ir.meta import q
from fxq.ir.ops import set_eval_
from fxq.ir.passbase import FxqPass, PassResult
from fxq.ir.taps import interest_nodes
from fxq.mp.plan import agree_, apply_plan, mp_state, solve_plan
from fxq.mp.sensitivity import SensitivityMeter, SensitivitySettings, activation_sites, weight_layers

__all__ = ["Sensitivity", "MixedPrecision"]


class Sensitivity(FxqPass):
    """NodeQ.sensitivity = {measure: {bits: distance}} for every weight layer (and activation site); NodeQ.macs."""

    def __init__(
        self,
        batches,
        config: MixedPrecisionConfig,
        settings: SensitivitySettings = SensitivitySettings(),
        progress=True,
        world: World = World(),
    ):
        self.batches, self.cfg, self.settings, self.progress = batches, config, settings, progress
        self.world = world  # the layers are measured by the ranks in turn (fxq.mp.sensitivity)

    def requires(self, gm: GraphModule) -> None:
        if not weight_layers(gm):
            raise GraphCheckFailed("sensitivity: no weight quantizers annotated; run Annotate first")
        shared = [t for t, nodes in call_sites(gm).items() if len(nodes) > 1 and q(nodes[0]).wspec is not None]
        if shared:
            raise UnsupportedOp(
                f"mixed precision: module '{shared[0]}' is called at {len(call_sites(gm)[shared[0]])} sites, and "
                f"the allocation gives each call its own width where a shared weight takes one; use one width for "
                f"all layers (no budget), or give each site its own module"
            )
        missing = [n.name for n in interest_nodes(gm) if q(n).lfh_weight is None]
        if missing and LossWeights.LFH in self.cfg.measures:
            raise GraphCheckFailed(f"sensitivity: no LFH weight on {missing[:3]}; run the LFH pass first")

    def call(self, gm: GraphModule) -> PassResult:
        set_eval_(gm)
        record = SensitivityMeter(self.batches, self.cfg, self.settings, self.progress, self.world).run(gm)
        state = mp_state(gm)
        state.measures, state.sensitivity_images = record["measures"], record["sensitivity_images"]
        state.stacked_layers = record["stacked_layers"]
        return PassResult(gm, modified=False)


class MixedPrecision(FxqPass):
    """Solve the bit allocation under each measure Sensitivity weighed and apply the first measure's plan (the
    others become candidates for SelectAllocation)."""

    def __init__(self, config: MixedPrecisionConfig, act_bits: int = 8, world: World = World()):
        self.cfg, self.act_bits, self.world = config, act_bits, world

    def _measures(self, gm: GraphModule) -> list[str]:
        # as Sensitivity weighed them; sensitivities set by other means count as the configured measure's
        return mp_state(gm).measures or [self.cfg.loss_weights.value]

    def requires(self, gm: GraphModule) -> None:
        first = self._measures(gm)[0]
        missing = [n.name for n in weight_layers(gm) if first not in (q(n).sensitivity or {})]
        if self.cfg.act_bit_options:
            missing += [n.name for n in activation_sites(gm) if first not in (q(n).act_sensitivity or {})]
        if missing:
            raise GraphCheckFailed(f"mixed precision: no sensitivities on {missing[:3]}; run Sensitivity first")

    def call(self, gm: GraphModule) -> PassResult:
        measures = self._measures(gm)
        # every rank solves the same ILP on the same table; rank 0's widths hold should a solver's ties differ
        plans = {m: agree_(solve_plan(gm, self.cfg, self.act_bits, m), self.world) for m in measures}
        apply_plan(gm, plans[measures[0]])
        mp_state(gm).candidates = plans if len(plans) > 1 else {}
        return PassResult(gm, modified=True)
