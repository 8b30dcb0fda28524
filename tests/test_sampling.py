from strategies.sampling import sample_node_ids


def test_full_participation_returns_every_node_sorted():
    assert sample_node_ids([5, 1, 3], fraction=1.0, seed=0, server_round=1) == [1, 3, 5]


def test_fraction_is_rounded_up_and_never_empty():
    assert len(sample_node_ids(range(10), fraction=0.25, seed=0, server_round=1)) == 3
    assert len(sample_node_ids(range(10), fraction=0.01, seed=0, server_round=1)) == 1
    assert sample_node_ids([], fraction=0.5, seed=0, server_round=1) == []


def test_sample_is_seeded_and_changes_with_the_round():
    first = sample_node_ids(range(100), fraction=0.1, seed=7, server_round=1)
    assert first == sample_node_ids(range(100), fraction=0.1, seed=7, server_round=1)
    assert first != sample_node_ids(range(100), fraction=0.1, seed=7, server_round=2)
    assert first == sorted(set(first))


def test_sample_ignores_the_order_nodes_are_listed_in():
    nodes = list(range(50))
    assert sample_node_ids(nodes, fraction=0.2, seed=1, server_round=3) == sample_node_ids(
        nodes[::-1], fraction=0.2, seed=1, server_round=3
    )
