"""The seed README's vLLM example, as written, inside the `__main__` guard
vLLM's spawned processes need, except: the model is a synthesized folder
(argv[1]; no network), the store is argv[2], the TCP listener on a free
loopback port (argv[3]), a 64 MiB memory pool, and the engine's settings
for a short CPU run (common.llm_args() less the dtype, which the example
gives)."""

import sys

import common

if __name__ == "__main__":
    import time
    import flashtensors as ft
    from vllm import SamplingParams

    extra = {k: v for k, v in common.llm_args().items() if k != "dtype"}

    ft.shutdown_server()  # Ensure any existing server is shut down

    ft.configure(
        storage_path=sys.argv[2],                # Where models will be stored
        mem_pool_size=1024**2*64,                # (64 MiB here)
        chunk_size=1024**2*32,                   # 32MB chunks
        num_threads=4,                           # Number of threads
        gpu_memory_utilization=0.8,             # Use 80% of GPU memory
        server_host="127.0.0.1",                # gRPC server host
        server_port=int(sys.argv[3])            # gRPC server port
    )

    ft.activate_vllm_integration()

    model_id = sys.argv[1]

    result = ft.register_model(
        model_id=model_id,
        backend="vllm",
        torch_dtype="bfloat16",
        force=False,
        hf_token=None
    )

    load_start_time = time.time()
    llm = ft.load_model(
        model_id=model_id,
        backend="vllm",
        dtype="bfloat16",
        gpu_memory_utilization=0.8,
        **extra
    )
    load_time = time.time() - load_start_time
    print(f"Model loaded successfully with fast loading in {load_time:.2f}s")

    prompts = [
        "Hello, my name is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.1, top_p=0.95, max_tokens=50)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"   Prompt: {prompt!r}")
        print(f"   Generated: {generated_text!r}")

    ft.cleanup_gpu()

    info = ft.get_model_info(model_id)
    if info:
        print(f"   Model ID: {info['model_id']}")
        print(f"   Backend: {info['backend']}")
        print(f"   Size: {info['size'] / (1024**3):.2f} GB")
        print(f"   Ranks: {info['ranks']}")

    models = ft.list_models()
    for model_key, model_info in models.items():
        print(f"   {model_key}: {model_info['size'] / (1024**3):.2f} GB")
    # ---- end of the example
    print(f"status: {result['status']}", flush=True)
    del llm
    ft.shutdown_server()
