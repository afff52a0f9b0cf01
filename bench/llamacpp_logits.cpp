// The logits llama.cpp computes for a token sequence fed one token at a time (its cached
// decoding path), written as float32 rows to a file: the other side of bench_llamacpp.py's
// logit agreement check. Compiled by that script against a llama.cpp build (include/ and the
// shared libllama); not part of the dsv3 build.
//
//   llamacpp_logits MODEL.gguf OUT.bin THREADS TOKEN...
//
// OUT.bin: len(TOKEN) rows of n_vocab float32, row i = the logits after token i. The KV cache
// is float32 and flash attention off, so that f32 weights give llama.cpp's f32 computation.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s MODEL.gguf OUT.bin THREADS TOKEN...\n", argv[0]);
        return 2;
    }
    const int threads = std::atoi(argv[3]);
    std::vector<llama_token> tokens;
    for (int i = 4; i < argc; ++i) tokens.push_back(std::atoi(argv[i]));

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model* model = llama_model_load_from_file(argv[1], mp);
    if (!model) { std::fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(tokens.size() + 16);
    cp.n_batch = cp.n_ubatch = 1;
    cp.n_threads = cp.n_threads_batch = threads;
    // float32 everywhere: the default KV cache is f16 (an error of ~1e-3 in the logits)
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context* ctx = llama_init_from_model(model, cp);
    if (!ctx) { std::fprintf(stderr, "cannot create a context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    FILE* out = std::fopen(argv[2], "wb");
    if (!out) { std::fprintf(stderr, "cannot write %s\n", argv[2]); return 1; }
    for (size_t i = 0; i < tokens.size(); ++i) {
        llama_batch b = llama_batch_get_one(&tokens[i], 1);
        if (llama_decode(ctx, b) != 0) { std::fprintf(stderr, "decode failed at %zu\n", i); return 1; }
        const float* row = llama_get_logits_ith(ctx, -1);
        if (!row || std::fwrite(row, sizeof(float), n_vocab, out) != static_cast<size_t>(n_vocab)) {
            std::fprintf(stderr, "no logits at %zu\n", i);
            return 1;
        }
    }
    std::fclose(out);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
