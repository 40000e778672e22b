"""The gateway's state: configuration, the target's tokenizer, request limits, metrics, the
figures poller (whose drafter clients also carry the requests), and how a request's ``model``
picks a drafter."""

from __future__ import annotations

import zmq.asyncio

from gateway.generation import Generation
from gateway.metrics import GatewayMetrics
from gateway.openai_api import ApiError, GenerationRequest, Limits
from gateway.pipeline_stats import PipelineState, StatsPoller
from pipeline.config import Config

DRAFTER_RETRY_AFTER_S = 2.0


class Gateway:
    def __init__(self, config: Config, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.limits = Limits(
            max_prompt_tokens=config.gateway.max_prompt_tokens,
            max_new_tokens=config.limits.max_new_tokens,
            max_history_tokens=config.limits.max_history_tokens,
            vocab_size=len(tokenizer),
        )
        self.stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.target = config.verifier.target
        self.default_drafter = config.gateway.default_model or (config.demo.drafters or list(config.drafters))[0]
        config.drafter(self.default_drafter)  # fail at start, not on the first request
        # a request's "model": a drafter (device class), or the target / "sled" for the default drafter
        self.model_names = {*config.drafters, self.target, "sled"}
        self.state = PipelineState.for_config(config)
        self.metrics = GatewayMetrics(self.state)
        self.ctx: zmq.asyncio.Context | None = None
        self.poller: StatsPoller | None = None

    def open(self) -> StatsPoller:
        """Sockets are made on the running loop (called from the app's cleanup context)."""
        self.ctx = zmq.asyncio.Context()
        self.poller = StatsPoller(self.config, self.ctx, self.state)
        return self.poller

    def close(self) -> None:
        if self.poller is not None:
            self.poller.close()
        if self.ctx is not None:
            self.ctx.term()

    def drafter_for(self, model: str) -> str:
        return model if model in self.config.drafters else self.default_drafter

    async def generation(self, request: GenerationRequest) -> Generation:
        """A session for this request on the drafter its model names; 503 when that drafter is down."""
        name = self.drafter_for(request.model)
        figures = self.state.drafters[name]
        if not figures.up and not await self.poller.probe_drafter(name):
            raise ApiError(503, f"drafter {name!r} is not answering; try again shortly", code="drafter_unavailable",
                           type_="server_error", retry_after=DRAFTER_RETRY_AFTER_S)
        return Generation(
            request, self.poller.clients[name], drafter=name, kind=figures.kind, tokenizer=self.tokenizer,
            stop_ids=self.stop_ids, metrics=self.metrics, timeout_s=self.config.limits.request_timeout_s,
        )

    def models(self) -> list[dict]:
        out = [{"id": self.target, "object": "model", "created": 0, "owned_by": "sled",
                "sled": {"role": "target", "default_drafter": self.default_drafter}}]
        for name, fig in self.state.drafters.items():
            out.append({"id": name, "object": "model", "created": 0, "owned_by": "sled",
                        "sled": {"role": "drafter", "kind": fig.kind, "gamma": fig.gamma, "available": fig.up,
                                 "default": name == self.default_drafter}})
        return out
