"""docs/nodes.md's node reference matches the live node definitions (regenerate: python tests/node_reference.py)."""
from node_reference import REFERENCE, pack_node_ids, render


def test_node_reference_is_current(comfy):
    block = render(comfy.nodes, pack_node_ids(comfy.nodes))
    assert block in REFERENCE.read_text(), "docs/nodes.md's reference is stale: run `python tests/node_reference.py`"
