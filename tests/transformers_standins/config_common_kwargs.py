"""Stand-in for transformers' `tests/utils/test_configuration_utils.py`, which its sdist does not ship.

`ConfigTester.check_config_arguments_init` builds a config from these general `PreTrainedConfig` fields, each
different from its default, and checks that every one is stored as given.
"""

config_common_kwargs = {
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
