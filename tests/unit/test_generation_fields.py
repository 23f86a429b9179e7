"""docs/generation-config.md's table covers every field of the installed transformers'
GenerationConfig, and what it calls served is a field of ours."""

from transformers import GenerationConfig

from genrpc import generation_fields
from genrpc.v1 import generation_pb2 as pb


def transformers_fields() -> set[str]:
    return {name for name in GenerationConfig().to_dict()
            if not name.startswith("_") and name != "transformers_version"}


def test_every_transformers_field_is_placed():
    placed = set(generation_fields.FIELDS)
    assert transformers_fields() - placed == set(), "transformers has fields the table does not say what to do with"
    assert placed - transformers_fields() == set(), "the table names fields transformers no longer has"


def test_served_fields_are_ours_and_the_others_are_not_pretended():
    ours = set(pb.GenerationConfig.DESCRIPTOR.fields_by_name)
    statuses = {generation_fields.SERVED, generation_fields.SERVER, generation_fields.NOT_APPLICABLE,
                generation_fields.NOT_YET}
    for name, (status, field, note) in generation_fields.FIELDS.items():
        assert status in statuses, name
        if status == generation_fields.SERVED:
            assert field in ours, name
        elif status == generation_fields.NOT_YET:
            assert field in ours or field == "", name  # our field exists to refuse it by name
        else:
            assert field == "", name
        assert note or status == generation_fields.SERVED, f"{name}: say why"


def test_the_doc_is_the_table():
    with open(generation_fields.DOC) as f:
        assert f.read() == generation_fields.markdown(), "run python -m genrpc.generation_fields"
