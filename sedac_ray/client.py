"""A small gRPC client for sedac-ray.

from sedac_ray.client import SedacClient
with SedacClient("127.0.0.1:9000") as client:
    reply = client.generate("What is the capital of France?", chat=True, max_tokens=32)
    print(reply.text, list(reply.exit_layers))
    for chunk in client.stream("Tell me a story", max_tokens=64):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from sedac_ray.serve.generated import sedac_pb2, sedac_pb2_grpc


class SedacClient:
    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        api_key: str | None = None,
        timeout_s: float = 300.0,
        application: str | None = None,
    ):
        """``application``: the Serve application to call, needed where the cluster runs more
        than one (Serve's gRPC proxy routes on this metadata)."""
        self.channel = grpc.insecure_channel(target)
        self.stub = sedac_pb2_grpc.SedacServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        if application is not None:
            self.metadata.append(("application", application))
        self.timeout_s = timeout_s

    @staticmethod
    def request(
        prompt: str,
        chat: bool = False,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
        tau: float | None = None,
        k: int | None = None,
        min_layer: int | None = None,
        window: int | None = None,
        disable_exit: bool = False,
        speculative: bool = False,
        stream_drafts: bool = False,
        n: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> sedac_pb2.GenerateRequest:
        exit_config = sedac_pb2.ExitConfig(
            disable=disable_exit, speculative=speculative, stream_drafts=stream_drafts
        )
        for name, value in (("tau", tau), ("k", k), ("min_layer", min_layer), ("window", window)):
            if value is not None:
                setattr(exit_config, name, value)
        request = sedac_pb2.GenerateRequest(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop or [],
            exit=exit_config,
            n=n,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        if chat:
            request.messages.append(sedac_pb2.ChatMessage(role="user", content=prompt))
        else:
            request.prompt = prompt
        return request

    def generate(self, prompt: str, **kwargs) -> sedac_pb2.GenerateResponse:
        return self.stub.Generate(
            self.request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout_s
        )

    def stream(self, prompt: str, **kwargs) -> Iterator[sedac_pb2.GenerateChunk]:
        yield from self.stub.GenerateStream(
            self.request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout_s
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SedacClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
