"""Shared fixtures: the real default model, and the real services as processes on free ports."""

from __future__ import annotations

import grpc
import pytest
import torch

from tests.helpers import MODEL, start_stack


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack():
    """The three services with the default model, default dtype (bfloat16) and quantization (4bit)."""
    s = start_stack(MODEL)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def channel(stack):
    with grpc.insecure_channel(stack.gateway.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from genrpc.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL, padding_side="left")


@pytest.fixture(scope="session")
def reference_model():
    """In-process transformers model, loaded as the model service loads it by default (its output layer
    too: int8 where the native kernel's int8 product runs)."""
    from model_svc.__main__ import check_output_layer, parse_args
    from model_svc.loader import load_model

    return load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer=check_output_layer(parse_args([])))
