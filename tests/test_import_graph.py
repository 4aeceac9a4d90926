"""Generic code never imports ShapesWorld (benchmarks/import_graph.py, run as a test)."""

from diffalign.benchmarks import import_graph


def test_no_generic_module_imports_the_world():
    graph = import_graph.static_graph()
    assert (
        "diffalign.pipeline" in graph
        and "diffalign.rewards.contrast" in graph
        and "diffalign.cli.bench" in graph
    )
    assert not any(name.startswith("diffalign.shapes") for name in graph)  # the world itself is not generic
    assert import_graph.world_imports(graph) == {}
    assert import_graph.loaded_world_modules(list(graph)) == []


def test_the_check_sees_an_import_of_the_world(tmp_path):
    """The static check reads function-local and relative imports too: it would catch a regression."""
    module = tmp_path / "loader.py"
    module.write_text("def load():\n    from diffalign.shapes import assets\n    from . import world\n")
    known = {"diffalign.shapes.assets"}
    assert "diffalign.shapes.assets" in import_graph.imported_names(module, "diffalign.shapes.loader", known)
    assert "diffalign.shapes.world" in import_graph.imported_names(
        module, "diffalign.shapes.loader", known | {"diffalign.shapes.world"}
    )
