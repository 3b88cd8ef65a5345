from workflows.tracking import flatten, redact


def test_fields_named_after_tokens_keep_their_values():
    params = flatten({"data": {"max_tokens": 1000}, "evaluate": {"max_new_tokens": 32},
                      "pretrain": {"tokenizer": "HuggingFaceTB/SmolLM2-135M"},
                      "fetch": {"revision": "0123456789abcdef0123456789abcdef01234567"}})
    assert params["data.max_tokens"] == "1000"
    assert params["evaluate.max_new_tokens"] == "32"
    assert params["pretrain.tokenizer"] == "HuggingFaceTB/SmolLM2-135M"
    assert params["fetch.revision"] == "0123456789abcdef0123456789abcdef01234567"


def test_real_secrets_never_pass():
    aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    hf = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY"
    out = redact({"storage.note": f"key {aws_secret}", "fetch.source": f"hub {hf}",
                  "tracking.uri": "https://alice:s3cr3tpw@mlflow.example.com/x",
                  "storage.aws_secret_access_key": "short", "fetch.hf_token": "x",
                  "storage.key_id": "AKIAIOSFODNN7EXAMPLE"})
    joined = " ".join(out.values())
    for secret in (aws_secret, hf, "s3cr3tpw", "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in joined
    assert out["tracking.uri"] == "https://alice:***@mlflow.example.com/x"
    assert out["storage.aws_secret_access_key"] == "***" and out["fetch.hf_token"] == "***"


def test_experiment_opens_in_the_model_training_view(tmp_path):
    from mlflow import MlflowClient

    from workflows.tracking import EXPERIMENT_KIND, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "drope-kind", artifact_root=tmp_path / "art")
    exp = MlflowClient(uri).get_experiment_by_name("drope-kind")
    assert exp.tags[EXPERIMENT_KIND] == "custom_model_development"
