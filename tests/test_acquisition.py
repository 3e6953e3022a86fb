"""What to annotate next (model.acquisition): typical first on a cold start, rare labels favoured, clusters spread,
failed tasks last, and Label Studio's label stream over the clusters."""
import numpy as np

from model.acquisition import Pool, TaskView, acquire, cluster_tasks, kmeans, label_stream


def blobs(rng, centers, per, spread=0.05):
    """Points around each center, the center's own index as the blob."""
    points = np.concatenate([c + spread * rng.standard_normal((per, len(c))) for c in centers])
    return points, np.repeat(np.arange(len(centers)), per)


def pool_of(features, errors=None, presence=None, annotated=None, failed=None):
    n = len(features)
    return Pool(np.asarray(features, float), np.zeros(n) if errors is None else np.asarray(errors, float),
                np.ones((n, 2)) if presence is None else np.asarray(presence, float), np.zeros(n),
                np.zeros(n, bool) if annotated is None else np.asarray(annotated, bool),
                np.zeros(n, bool) if failed is None else np.asarray(failed, bool))


def test_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(0)
    points, truth = blobs(rng, np.eye(4) * 3, 25)
    found = kmeans(points, 4)
    # Each blob is one cluster and each cluster one blob.
    assert all(len(set(found[truth == b])) == 1 for b in range(4)) and len(set(found)) == 4


def test_a_cold_start_takes_each_clusters_most_typical_task_first():
    rng = np.random.default_rng(1)
    points, truth = blobs(rng, np.eye(3) * 3, 30)
    outliers = np.eye(3) * 3 + 0.6  # one far member of each blob, the most uncertain of all
    features = np.concatenate([points, outliers])
    errors = np.concatenate([np.full(90, 0.1), np.full(3, 0.9)])
    chosen = acquire(pool_of(features, errors), batch=3, label_counts=np.zeros(2), typical_below=10)
    assert chosen.typical
    first = chosen.order[:3]
    assert sorted(truth[first]) == [0, 1, 2]  # one per blob
    for task in first:  # the densest: not the far, uncertain member, and nearer the blob's centre than most
        members = points[truth == truth[task]]
        distances = np.linalg.norm(members - members.mean(0), axis=1)
        assert task < 90 and np.linalg.norm(points[task] - members.mean(0)) <= np.median(distances)


def test_after_the_cold_start_labels_with_few_examples_come_first():
    features = np.ones((4, 2)) + np.arange(4)[:, None] * 1e-3  # one cluster: the order is by value alone
    presence = [[1, 0], [0, 1], [1, 0], [0, 1]]  # tasks 0, 2 show label 0; tasks 1, 3 label 1
    errors = [0.5, 0.4, 0.1, 0.1]
    annotated = [False, False, True, True]
    common_label_0 = acquire(pool_of(features, errors, presence, annotated), 1, np.array([40, 0]), typical_below=2)
    assert not common_label_0.typical
    assert common_label_0.order[0] == 1  # less uncertain, but its label has no example yet
    # With both labels alike, the more uncertain task leads.
    alike = acquire(pool_of(features, errors, presence, annotated), 1, np.array([5, 5]), typical_below=2)
    assert alike.order[0] == 0


def test_any_prefix_of_the_order_is_spread_over_the_clusters():
    rng = np.random.default_rng(2)
    points, truth = blobs(rng, np.eye(5) * 3, 20)
    errors = np.where(truth == 0, 0.9, 0.1) + rng.uniform(0, 0.01, len(truth))  # blob 0 is all hard
    chosen = acquire(pool_of(points, errors), batch=5, label_counts=np.zeros(2), typical_below=0)
    assert sorted(truth[chosen.order[:5]]) == [0, 1, 2, 3, 4]  # not five from the hard blob
    assert sorted(truth[chosen.order[5:10]]) == [0, 1, 2, 3, 4]


def test_failed_tasks_come_last_and_the_rest_still_get_an_order():
    rng = np.random.default_rng(3)
    points, _ = blobs(rng, np.eye(2) * 3, 4)
    views = [TaskView(p, 0.2, np.ones(2), 0.5) for p in points]
    views[2] = None
    pool = Pool.of(views, np.zeros(len(views), bool))
    chosen = acquire(pool, batch=20, label_counts=np.zeros(2), typical_below=100)  # a batch above the pool
    assert chosen.order[-1] == 2 and sorted(chosen.order) == list(range(8))
    assert chosen.clusters[2] == -1 and (np.delete(chosen.clusters, 2) >= 0).all()
    assert (cluster_tasks(Pool.of([None, None], np.zeros(2, bool)), 5) == -1).all()  # nothing usable


def test_clusters_count_the_annotated_tasks_and_the_next_batch():
    rng = np.random.default_rng(4)
    points, _ = blobs(rng, np.eye(6) * 3, 10, spread=0.3)
    annotated = np.zeros(60, bool)
    annotated[:4] = True
    assert len(set(cluster_tasks(pool_of(points, annotated=annotated), 3))) == 7


def test_the_label_stream_takes_the_least_annotated_cluster_then_the_lowest_score():
    clusters = np.array([0, 0, 0, 1, 1, 2, -1])
    scores = np.array([0.1, 0.2, 0.3, 0.5, 0.4, 0.9, 0.0])
    annotated = np.array([False, False, False, False, False, False, False])
    # Lowest overall, then the lowest of the clusters nobody annotated, then the second round; failed last.
    assert label_stream(clusters, scores, annotated, 7) == [0, 4, 5, 1, 3, 2, 6]
    annotated[4] = True
    assert label_stream(clusters, scores, annotated, 2) == [0, 5]
