"""The request limits that more than one side checks, defined once: the gateway validates them
(gateway/validation.py), the model service checks what reaches it (model_svc), and the CLI refuses
them before a call (genrpc/cli.py)."""

MAX_PRIORITY = 100  # priorities are -MAX_PRIORITY .. MAX_PRIORITY, higher first
MAX_PROMPT_LOOKUP = 32  # proposals a step may verify for one sequence (speculative decoding)
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0  # biases are in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]
MAX_TOP_LOGPROBS = 20  # alternatives a position may return (top_logprobs, prompt_logprobs)
MAX_RETURN_SEQUENCES = 16  # samples per prompt
MAX_TIME_LIMIT_MS = 3_600_000
MAX_CACHE_SALT = 256  # characters of a request's cache_salt
# generate()'s other processors (GenerationConfig fields 32-42)
MAX_NO_REPEAT_NGRAM = 64
MAX_SUPPRESS_TOKENS = 1024  # ids in suppress_tokens, and in begin_suppress_tokens
MAX_FORCED_EOS = 16
MAX_SEQUENCE_BIAS = 300  # sequences in sequence_bias
MAX_SEQUENCE_BIAS_LENGTH = 16  # tokens in one of them
MAX_OCCURRENCE_PENALTY = 2.0  # frequency_penalty and presence_penalty are in [-2, 2] (OpenAI's range)
MAX_DECAY_START = 1 << 20  # exponential_decay_length_penalty's start_index
MAX_DECAY_FACTOR = 10.0
WATERMARK_DEFAULTS = dict(greenlist_ratio=0.25, bias=2.0, hashing_key=15485863, seeding_scheme="lefthash",
                          context_width=1)  # transformers' WatermarkingConfig defaults
WATERMARK_SCHEMES = ("lefthash", "selfhash")
MAX_WATERMARK_BIAS = 100.0
MAX_WATERMARK_KEY = 2**31 - 1
MAX_WATERMARK_CONTEXT = 16
MAX_BEAMS = 16  # num_beams (beam search)
MAX_STOP_STRINGS = 16  # stop strings a request may name
MAX_MATCHING_NGRAM = 8  # max_matching_ngram_size: the longest n-gram prompt lookup matches
# A LoRA adapter's name (--lora NAME=PATH, LoadAdapter): 1-64 letters, digits, '.', '_' or '-',
# starting with a letter or digit
ADAPTER_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
