"""How a run's training users are dealt to its Train workers."""

import numpy as np

from allmrec.data.prepared import worker_users


def test_workers_take_equal_disjoint_shares_whatever_the_order_given():
    users = np.random.default_rng(0).permutation(np.arange(1, 944))  # 943 users, shuffled
    shares = [worker_users(users, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [471, 471]  # one user left out: equal step counts
    assert not set(shares[0]) & set(shares[1])
    assert all((np.diff(s) > 0).all() for s in shares)  # sorted: the same share every run
    assert np.array_equal(worker_users(users, 0, 1), np.arange(1, 944))  # one worker: all
    assert np.array_equal(worker_users(users[::-1], 1, 2), shares[1])


def test_three_workers_leave_out_at_most_two_users():
    shares = [worker_users(np.arange(10), rank, 3) for rank in range(3)]
    assert [s.tolist() for s in shares] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
