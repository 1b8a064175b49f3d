from data.classes import class_name, imagenet_index, imagenet_names, imagenet_wnids, is_wnid


def test_thousand_sorted_unique_wnids():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids))
    assert wnids == sorted(wnids)
    assert all(is_wnid(w) for w in wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"


def test_well_known_names():
    idx, names = imagenet_index(), imagenet_names()
    assert names[idx["n01440764"]] == "tench, Tinca tinca"
    assert names[idx["n02085620"]] == "Chihuahua"
    assert names[idx["n15075141"]].startswith("toilet tissue")
    assert class_name(idx["n01443537"]) == "goldfish"
    # Labels used throughout the literature: 207 golden retriever, 281 tabby, 388 giant panda, 980 volcano.
    assert class_name(207) == "golden retriever"
    assert class_name(281) == "tabby"
    assert class_name(388) == "giant panda"
    assert class_name(980) == "volcano"
    # The two classes that share the name "crane" and "maillot" are distinct WNIDs.
    assert [class_name(i) for i in (134, 517)] == ["crane", "crane"]
    assert class_name(638) == "maillot" and class_name(639) == "maillot"
