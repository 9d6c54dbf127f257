"""The runner's UI -> API conversion (workflows/workflow_graph.py) on graph shapes the pack's workflows lack.

Reroute chains, PrimitiveNode values, muted and bypassed nodes, widget values saved as a dict, and the one-line
errors. The node definitions are small hand-written ones in /object_info's format: this checks the runner's own
conversion rules; that they match the live definitions and ComfyUI's frontend is tests/comfyui/test_workflows.py
and tests/comfyui/test_browser.py.
"""
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "workflows"))

from workflow_graph import HeadlessError, coerce, ui_to_api  # noqa: E402

DEFINITIONS = {
    "Source": {"input": {"required": {"seed": ["INT", {}], "mode": [["a", "b"], {}]}}, "output": ["LATENT"]},
    "Sink": {"input": {"required": {"latent": ["LATENT", {}], "steps": ["INT", {}]},
                       "optional": {"scale": ["FLOAT", {"forceInput": True}]}}, "output": ["IMAGE"],
             "display_name": "The Sink"},
}


def node(node_id, kind, widgets=(), links=(), mode=0):
    return {"id": node_id, "type": kind, "mode": mode, "widgets_values": list(widgets),
            "inputs": [{"name": name, "link": link} for name, link in links]}


def workflow(*nodes, links=()):
    return {"nodes": list(nodes), "links": [list(link) for link in links]}


def convert(ui):
    return ui_to_api(ui, DEFINITIONS.__getitem__)


def test_reroutes_are_followed_primitives_inlined_notes_and_muted_nodes_dropped():
    ui = workflow(node(1, "Source", [5, "fixed", "b"]), node(2, "Reroute", links=[("", 10)]),
                  node(3, "Reroute", links=[("", 11)]), node(4, "PrimitiveNode", [0.5]), node(5, "Note", ["read me"]),
                  node(6, "Sink", [3], [("latent", 12), ("scale", 13)]),
                  node(7, "Source", [1, "fixed", "a"], mode=2), node(8, "Sink", [9], [("latent", 14)]),
                  links=[(10, 1, 0, 2, 0, "LATENT"), (11, 2, 0, 3, 0, "LATENT"), (12, 3, 0, 6, 0, "LATENT"),
                         (13, 4, 0, 6, 2, "FLOAT"), (14, 7, 0, 8, 0, "LATENT")])
    assert convert(ui) == {
        "1": {"inputs": {"seed": 5, "mode": "b"}, "class_type": "Source", "_meta": {"title": "Source"}},
        "6": {"inputs": {"steps": 3, "latent": ["1", 0], "scale": 0.5}, "class_type": "Sink",
              "_meta": {"title": "The Sink"}},
        "8": {"inputs": {"steps": 9}, "class_type": "Sink", "_meta": {"title": "The Sink"}},  # its source is muted
    }


def test_widget_values_saved_as_a_dict_keep_only_widget_names():
    ui = workflow(node(1, "Source"))
    ui["nodes"][0]["widgets_values"] = {"seed": 3, "mode": "a", "not_a_widget": 1}
    assert convert(ui)["1"]["inputs"] == {"seed": 3, "mode": "a"}


@pytest.mark.parametrize("change,message", [
    (lambda ui: ui["nodes"][0].update(mode=4), "node 1 (Source) is bypassed"),
    (lambda ui: ui["nodes"][0].update(widgets_values=[1]),
     "has 1 widget values but its definition has 3 widgets (seed, seed:control, mode)"),
    (lambda ui: ui["nodes"][1]["inputs"][0].update(link=99), "node 2 refers to link 99"),
    (lambda ui: ui["nodes"][0].update(type="Missing"), "unknown node type 'Missing'"),
    (lambda ui: ui.update(definitions={"subgraphs": [{}]}), "uses subgraphs"),
])
def test_unsupported_or_broken_graphs_are_one_line_errors(change, message):
    ui = workflow(node(1, "Source", [5, "fixed", "a"]), node(2, "Sink", [3], [("latent", 10)]),
                  links=[(10, 1, 0, 2, 0, "LATENT")])
    change(ui)
    with pytest.raises(HeadlessError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        convert(ui)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


@pytest.mark.parametrize("spec,value,expected", [
    (["INT", {}], "12", 12), (["FLOAT", {}], "0.25", 0.25), (["BOOLEAN", {}], "off", False),
    (["STRING", {}], "x", "x"), ([[1, 2.5], {}], "2.5", 2.5), (["COMBO", {"options": ["a"]}], "zz", "zz"),
])
def test_command_line_values_become_the_inputs_type(spec, value, expected):
    assert coerce(spec, value, "--set") == expected


@pytest.mark.parametrize("spec,value", [(["INT", {}], "1.5"), (["FLOAT", {}], None), (["BOOLEAN", {}], "maybe"),
                                        (["STRING", {}], 3), ([["a"], {}], 3)])
def test_values_of_another_type_are_refused(spec, value):
    with pytest.raises(HeadlessError, match="--set expects"):
        coerce(spec, value, "--set")
