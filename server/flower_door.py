"""The server side's one door into Flower's non-public API (pinned by ``tests/test_flower_doors.py``).

Everything else under ``privet.server`` and ``privet.simulations`` imports only Flower's public
API (``flwr.app``, ``flwr.serverapp``, ``flwr.serverapp.strategy``, ``flwr.simulation``) or a
door. Each name below says why the public API does not serve; when a Flower release moves one of
them, the contract tests name the symbol.

Six concerns pass through here:

- the types in the signatures of ``Grid``'s abstract methods (a grid wrapper must name them);
- a message's private metadata (a simulated population stands in for its clients) and the task
  identity ``Message()`` stamps (the in-process engine runs outside Flower's processes);
- two private methods of Flower's adaptive-clipping DP wrappers, behind public hooks;
- the attribute names of Flower's stateful strategies (a resumed coordinator restores them);
- SecAgg+, which Flower implements only in its legacy API;
- the ``flwr`` CLI's output, where the SuperLink offers no state a coordinator can ask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

# SecAgg+ stage constants (legacy API only, see below) and the clip key of Flower's DP mods.
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

# Grid.get_nodes() returns NodeInfo and Grid.run is a Run: the public Grid's own signatures name
# these, and flwr.serverapp exports neither.
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.run import Run

__all__ = [
    "CLIPPING_NORM_KEY",
    "SECAGG_CONFIGS_KEY",
    "SECAGG_STAGE_KEY",
    "STAGE_MASKED_UPLOAD",
    "AdaptiveClipHooks",
    "ClientSideAdaptiveClipping",
    "NodeInfo",
    "Run",
    "ServerSideAdaptiveClipping",
    "flower_state_fields",
    "register_outcome",
    "secaggplus_mean",
    "set_src_node_id",
    "set_task_node",
    "task_identity",
]


# -- message metadata and task identity ----------------------------------------------------------


def set_src_node_id(reply: Message, node_id: int) -> None:
    """Name ``node_id`` as the sender of ``reply``.

    Flower's ``Metadata`` has no setter for the sender (a deployed reply's sender is
    authenticated); a simulated population's stand-in node must show the client it played, so
    the strategy and the reply checks see that client.
    """
    reply.metadata.__dict__["_src_node_id"] = node_id


@contextlib.contextmanager
def task_identity(run_id: int, node_id: int = 0) -> Iterator[None]:
    """Run the block as task 1 of run ``run_id`` on node ``node_id``; restore the identity after.

    Flower's ``Message()`` stamps the run and node of the current task from a class-level
    singleton that only Flower's own processes set; privet's in-process engine plays both sides
    in one process.
    """
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = node_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def set_task_node(node_id: int) -> None:
    """Make ``node_id`` the current task's node (the in-process engine delivering to a client)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = node_id


# -- Flower's adaptive-clipping DP wrappers --------------------------------------------------------


class AdaptiveClipHooks:
    """Public hooks over two private steps of Flower 1.41's adaptive-clipping wrappers.

    Flower's wrappers call ``_add_noise_to_aggregated_arrays`` with their current
    ``clipping_norm`` and update it in ``_geometric_update``; no public API lets a subclass choose
    the clip the noise uses or the rule that moves it. Override :meth:`noise_clip` and
    :meth:`update_clip` instead; by default both do what Flower does.
    """

    clipping_norm: float

    def noise_clip(self) -> float:
        """The clip the noise of this round is scaled to (Flower: the already updated one)."""
        return self.clipping_norm

    def update_clip(self, clipped_fraction: float) -> None:
        """Move ``clipping_norm`` after a round whose clipped fraction (noised) is given."""
        super()._geometric_update(clipped_fraction)  # type: ignore[misc]

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated = self.clipping_norm
        self.clipping_norm = self.noise_clip()
        try:
            return cast(ArrayRecord, super()._add_noise_to_aggregated_arrays(aggregated))  # type: ignore[misc]
        finally:
            self.clipping_norm = updated

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.update_clip(clipped_fraction)


class ServerSideAdaptiveClipping(AdaptiveClipHooks, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with :class:`AdaptiveClipHooks`."""


class ClientSideAdaptiveClipping(AdaptiveClipHooks, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with :class:`AdaptiveClipHooks`."""


# -- the state of Flower's strategies -------------------------------------------------------------


def flower_state_fields(node: Strategy) -> tuple[str, ...] | None:
    """The attributes a Flower strategy carries from round to round; ``None``: not one of these.

    Flower has no API to save or restore a strategy (``Strategy.start`` always begins at round
    1); a resumed coordinator restores these attributes, whose names are Flower 1.41's
    (``flwr/serverapp/strategy``: ``fedopt.py``, ``fedavgm.py``, ``dp_adaptive_clipping.py``).
    """
    if isinstance(node, FedAdam | FedYogi | FedAdagrad):  # Flower's FedOpt family
        return ("current_arrays", "m_t", "v_t")
    if isinstance(node, FedAvgM):
        return ("current_arrays", "momentum_vector")
    if isinstance(
        node,
        DifferentialPrivacyServerSideAdaptiveClipping
        | DifferentialPrivacyClientSideAdaptiveClipping,
    ):
        return ("clipping_norm",)
    return None


# -- SecAgg+ (legacy API only) ------------------------------------------------------------------
# Flower implements SecAgg+ only for its legacy API (FLOWER.md): SecAggPlusWorkflow drives a
# legacy Strategy through a LegacyContext; these names live in flwr.server / flwr.common.

#: The config record the workflow adds to each stage's message, and the stage's key in it.
SECAGG_CONFIGS_KEY: str = RECORD_KEY_CONFIGS
SECAGG_STAGE_KEY: str = Key.STAGE
#: The stage whose replies carry each client's masked update (and its metrics).
STAGE_MASKED_UPLOAD: str = Stage.COLLECT_MASKED_VECTORS
#: The config key Flower's client-side clipping mods read the clip from.
CLIPPING_NORM_KEY: str = KEY_CLIPPING_NORM


def secaggplus_mean(
    grid: Any,
    *,
    contents: dict[int, RecordDict],
    server_round: int,
    num_shares: float,
    reconstruction_threshold: int,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    modulus_range: int,
    timeout: float,
) -> list[np.ndarray] | None:
    """Run Flower's SecAgg+ workflow once over the nodes of ``contents``; the unmasked mean.

    ``grid`` delivers the four stages (anything with ``send_and_receive``); node ``n``'s own
    train content ``contents[n]`` rides along in the masked-upload stage. Returns the weighted
    mean of the updates that arrived (the workflow's parameters), or ``None`` when it halted.
    """
    from flwr.common import (
        EvaluateIns,
        EvaluateRes,
        FitIns,
        FitRes,
        Parameters,
        Scalar,
        parameters_to_ndarrays,
    )
    from flwr.server import ClientManager, LegacyContext
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    class SumOnly(LegacyStrategy):
        """The legacy strategy the workflow drives: samples the given nodes, keeps the mean."""

        def __init__(self, proxies: list[ClientProxy]) -> None:
            self.proxies = proxies
            self.mean: Parameters | None = None

        def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
            return None

        def configure_fit(
            self, server_round: int, parameters: Parameters, client_manager: ClientManager
        ) -> list[tuple[ClientProxy, FitIns]]:
            # Empty instructions: privet's own train content replaces them after the setup stage.
            return [(p, FitIns(Parameters(tensors=[], tensor_type=""), {})) for p in self.proxies]

        def aggregate_fit(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, FitRes]],
            failures: list[tuple[ClientProxy, FitRes] | BaseException],
        ) -> tuple[Parameters | None, dict[str, Scalar]]:
            self.mean = results[0][1].parameters if results else None
            return self.mean, {}

        def configure_evaluate(
            self, server_round: int, parameters: Parameters, client_manager: ClientManager
        ) -> list[tuple[ClientProxy, EvaluateIns]]:
            return []

        def aggregate_evaluate(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, EvaluateRes]],
            failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
        ) -> tuple[float | None, dict[str, Scalar]]:
            return None, {}

        def evaluate(
            self, server_round: int, parameters: Parameters
        ) -> tuple[float, dict[str, Scalar]] | None:
            return None

    class Workflow(SecAggPlusWorkflow):
        """Flower's workflow, with privet's per-client train content in the masked upload."""

        def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
            ok = super().setup_stage(grid, context, state)
            state.nid_to_fitins = {nid: contents[nid] for nid in state.nid_to_fitins}
            return bool(ok)

    legacy = SumOnly([GridClientProxy(n, cast(Grid, None), 0) for n in contents])
    context = LegacyContext(
        Context(
            run_id=0,
            node_id=0,
            node_config={},
            state=RecordDict(
                {
                    MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                    MAIN_PARAMS_RECORD: ArrayRecord(),
                }
            ),
            run_config={},
        ),
        strategy=legacy,
    )
    workflow = Workflow(
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=modulus_range,
        timeout=timeout,
    )
    workflow(cast(Grid, grid), context)
    return None if legacy.mean is None else parameters_to_ndarrays(legacy.mean)


# -- the flwr CLI's output ------------------------------------------------------------------------


def register_outcome(returncode: int, output: str) -> str:
    """What ``flwr supernode register`` did: ``"registered"``, ``"not yet"`` or ``"failed"``.

    The CLI is Flower's public interface for registering a node key, but it says only in words
    that a key is already registered (fine: registered before) or that the SuperLink's Control
    API is not up yet (its health service answers SERVING a moment earlier).
    """
    text = output.lower()
    if returncode == 0 or "already" in text:
        return "registered"
    if "unavailable" in text:
        return "not yet"
    return "failed"
