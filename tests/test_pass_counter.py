"""overinterp/pipeline/pass_counter.py: the run's one actor that counts selection passes."""

import subprocess
import sys


def test_one_pass_counter_serves_every_pass_of_a_run_each_counted_apart(ray_session):
    """The run's PassCounter is one actor (an actor start is seconds of CPU on 2 cores), kept between
    passes; each selection pass reads its own total, and a forgotten pass is gone."""
    import ray

    from overinterp.pipeline.pass_counter import run_pass_counter

    first = run_pass_counter()._actor_id  # its handle dropped at once, as a selection pass drops it when done
    counter = run_pass_counter()
    assert counter._actor_id == first
    assert ray.get(counter.total.remote("none")) == 0.0  # alive: not destroyed with the dropped handle
    ray.get([counter.add.remote("a", "w1", 5.0), counter.add.remote("a", "w2", 2.0), counter.add.remote("b", "w1", 7.0)])
    assert ray.get([counter.total.remote("a"), counter.total.remote("b"), counter.total.remote("c")]) == [7.0, 7.0, 0.0]
    ray.get(counter.forget.remote("a"))
    assert ray.get([counter.total.remote("a"), counter.total.remote("b")]) == [0.0, 7.0]
    counter.forget.remote("b")


def test_the_counter_module_imports_neither_torch_nor_ray_data():
    """The actor's process imports this module: it must stay light (see its docstring)."""
    code = ("import sys, overinterp.pipeline.pass_counter; "
            "print(sorted(m for m in ('torch', 'ray.data', 'overinterp.pipeline.select_stage') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
