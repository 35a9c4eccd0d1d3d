"""The benchmark runs end to end (tiny sizes; the numbers themselves are not checked, they depend on the machine)."""

from mythos_train import bench


def test_bench_smoke(capsys):
    results = bench.main(
        ["--batch", "1", "--seq", "16", "--loops", "2", "--warmup", "0", "--steps", "1", "--peak-size", "128"]
    )
    assert results["mythos_train"]["tokens_per_s"] > 0 and results["mythos_train"]["mfu"] > 0
    if "open_mythos" in results:  # its ACT may leave the loop early, the full-depth run may not
        assert results["open_mythos_full_depth"]["loops_run"] == 2
    assert "MFU" in capsys.readouterr().out
