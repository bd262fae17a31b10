# XLA / libtpu / NCCL flag presets, sourced by the launchers (not run on its own):
#
#   PRESET=tpu source launch/xla_flags.sh     # or gpu, cpu, none
#
# Flags are APPENDED to what is already in the environment, and a flag whose name you already set (in XLA_FLAGS /
# LIBTPU_INIT_ARGS, with any value) is left as you set it: to change one value, export it before launching, e.g.
#   XLA_FLAGS=--xla_gpu_all_reduce_combine_threshold_bytes=268435456 launch/gpu_single_host.sh ...
# Environment variables (NCCL_*, XLA_PYTHON_CLIENT_MEM_FRACTION, ...) are only set when unset.
# PRESET=none adds nothing. Check a preset against the installed jax/jaxlib/libtpu (an unknown flag aborts every
# process at start-up):  PRESET=gpu source launch/xla_flags.sh && .venv/bin/python launch/check_xla_flags.py
#
# Every flag name below was checked against jaxlib 0.10.2 (XLA_FLAGS: an unknown name aborts with "Unknown flag in
# XLA_FLAGS") and libtpu 0.0.42 (LIBTPU_INIT_ARGS: "Unknown command line flag"), the versions requirements.txt
# resolves to on Python 3.11; tests/test_launch_scripts.py re-checks the GPU/CPU names against the installed jaxlib.
# XLA flags are experimental and version-dependent: re-check them when jax is upgraded.

# _xla_append VAR FLAG...: append each --name=value FLAG to the space-separated variable VAR unless VAR already
# has a flag called --name.
_xla_append() {
  local var=$1 flag name word have words
  shift
  for flag in "$@"; do
    name=${flag%%=*}
    have=0
    read -r -a words <<< "${!var:-}"
    for word in ${words[@]+"${words[@]}"}; do
      if [[ "${word%%=*}" == "$name" ]]; then have=1; fi
    done
    if ((have == 0)); then
      printf -v "$var" '%s' "${!var:+${!var} }$flag"
    fi
  done
  export "${var?}"
}

# _xla_default NAME VALUE: export NAME=VALUE unless NAME is already set (even to the empty string).
_xla_default() {
  if [[ -z "${!1+x}" ]]; then export "$1=$2"; fi
}

case "${PRESET:-none}" in
  tpu)
    # Cloud TPU (v4, v5e, v5p, v6e), via LIBTPU_INIT_ARGS (libtpu parses it; XLA_FLAGS does not reach the TPU
    # compiler's own options). Source: MaxText benchmarks/xla_flags_library.py (AI-Hypercomputer/maxtext), the
    # sets CF_FOR_ALL_GATHER / CF_FOR_ALL_REDUCE_AND_ALL_GATHER ("continuation fusion": async collectives fused
    # with the compute that overlaps them) and DATA_PARALLEL_OVERLAP, which MaxText's v5p/v6e model configs
    # (benchmarks/maxtext_v5p_model_configs.py, maxtext_trillium_model_configs.py) combine for FSDP training;
    # the same set is in MaxText's end_to_end/tpu scripts. The reduce-scatter fusion flag is the reduce-scatter
    # counterpart of the all-gather one (FSDP gradients), used in MaxText's/tpu-inference's newer flag sets.
    _xla_append LIBTPU_INIT_ARGS \
      --xla_tpu_enable_async_collective_fusion=true \
      --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
      --xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter=true \
      --xla_tpu_enable_async_collective_fusion_multiple_steps=true \
      --xla_tpu_overlap_compute_collective_tc=true \
      --xla_enable_async_all_gather=true \
      --xla_enable_async_all_reduce=true \
      --xla_tpu_enable_data_parallel_all_reduce_opt=true \
      --xla_tpu_data_parallel_opt_different_sized_ops=true
    # async collective fusion (+ its all-gather / reduce-scatter variants, multi-step): start FSDP weight
    #   all-gathers / gradient reduce-scatters early and overlap them with compute instead of waiting on them;
    # overlap_compute_collective_tc: let the TensorCore compute while collectives run;
    # enable_async_all_gather / all_reduce: schedule those collectives asynchronously;
    # data_parallel_all_reduce_opt + different_sized_ops: pipeline the data-parallel gradient all-reduces (across
    #   the `data` mesh axis / DCN) with the backward pass, also when the reduced tensors differ in size.
    ;;
  gpu)
    # NVIDIA GPUs (A100/H100/H200), via XLA_FLAGS. Sources: NVIDIA JAX-Toolbox "Tips for High-Performance LLMs with
    # JAX and XLA" (rosetta/docs/GPU_performance.md, docs.nvidia.com/jax-toolbox/performance-profiling/
    # gpu-performance) and MaxText's GPU scripts (end_to_end/gpu/a3/test_llama2_7b.sh), which use exactly these
    # values for FSDP training on 8-GPU H100 nodes. Left out on purpose: their --xla_gpu_enable_triton_gemm=false and
    # --xla_disable_hlo_passes=rematerialization (model-specific; the latter can raise peak memory) and
    # --xla_gpu_graph_level (removed from current XLA: it would abort start-up).
    _xla_append XLA_FLAGS \
      --xla_gpu_enable_latency_hiding_scheduler=true \
      --xla_gpu_enable_highest_priority_async_stream=true \
      --xla_gpu_enable_pipelined_all_gather=true \
      --xla_gpu_enable_pipelined_reduce_scatter=true \
      --xla_gpu_enable_pipelined_all_reduce=true \
      --xla_gpu_enable_while_loop_double_buffering=true \
      --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
      --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
      --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864 \
      --xla_gpu_enable_all_gather_combine_by_dim=false \
      --xla_gpu_enable_reduce_scatter_combine_by_dim=false
    # latency_hiding_scheduler: reorder so collectives overlap compute; highest_priority_async_stream: the
    #   collectives' stream gets priority, so an overlapped all-gather is not starved by compute kernels;
    # pipelined all-gather / reduce-scatter / all-reduce: inside the scanned layer stacks, gather layer i+1's
    #   weights and reduce layer i-1's gradients while layer i computes (FSDP);
    # while_loop_double_buffering: unroll scans by 2 so that pipelining has a buffer to prefetch into;
    # combine thresholds (bytes; 128/128/64 MiB): merge many small per-parameter collectives into few large ones;
    # combine_by_dim=false: also merge collectives over different dimensions.
    #
    # NCCL and JAX memory environment (only when unset). NCCL_DEBUG=WARN: NCCL warnings (a failed IB link, a
    # fallback to sockets) appear in the log instead of a silent slowdown (NCCL user guide, "Environment
    # variables"). Network selection (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GPUDirect-TCPX/RDMA plugins) is
    # cluster-specific: take it from your cluster's documentation. CUDA_DEVICE_MAX_CONNECTIONS=1 (older
    # JAX-Toolbox advice) is not set: NVIDIA's current guide says not to set it on Blackwell.
    _xla_default NCCL_DEBUG WARN
    # The share of GPU memory JAX's allocator takes up front (JAX default 0.75): the paper config needs more.
    _xla_default XLA_PYTHON_CLIENT_MEM_FRACTION 0.92
    ;;
  cpu)
    # CPU (the local multi-process rehearsal): cross-process collectives through gloo (jax's default on 0.10;
    # explicit for older/newer ones). The fake device count is the rehearsal script's business.
    _xla_default JAX_PLATFORMS cpu
    _xla_default JAX_CPU_COLLECTIVES_IMPLEMENTATION gloo
    ;;
  none) ;;
  *)
    echo "xla_flags.sh: unknown PRESET='${PRESET}' (use tpu, gpu, cpu or none)" >&2
    return 64 2>/dev/null || exit 64
    ;;
esac
