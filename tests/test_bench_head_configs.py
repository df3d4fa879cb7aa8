"""The benchmarks' synthetic head configurations (`moa_jax.bench.head_configs`)."""

from moa_jax.bench.head_configs import kv_density, plan_windows


def test_grouped_synthetic_plans_shrink_the_span_cache():
    s, h, hkv = 8192, 32, 8
    for kind, density in (("het50", 0.5), ("het25", 0.25)):
        for grouped in (False, True):
            w, sk = plan_windows(kind, s, h, hkv, dense_groups=grouped)
            assert abs(kv_density(w, sk, s) - density) < 0.01
            kept = [min(s, wi + si) for wi, si in zip(w, sk)]
            group_max = [max(kept[g * 4 : (g + 1) * 4]) for g in range(hkv)]
            cache = sum(group_max) / (hkv * s)
            if grouped:  # dense heads fill whole groups: cache = density
                assert abs(cache - density) < 0.01
            else:  # dense heads in half or all groups: cache stays large
                assert cache >= (1.0 if kind == "het50" else 0.55)
