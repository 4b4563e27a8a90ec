/* Copyright © 2023-2024 Apple Inc. */

#ifndef MLX_HALF_H
#define MLX_HALF_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) || defined(__aarch64__)
#define HAS_FLOAT16
#include <arm_fp16.h>
typedef __fp16 float16_t;
#endif

#if defined(__ARM_FEATURE_BF16) || defined(__aarch64__)
#define HAS_BFLOAT16
#include <arm_bf16.h>
typedef __bf16 bfloat16_t;
#endif

/* mlxserver change (4): 16-bit float types on x86 so the f16/bf16 entry points exist.
   Only size and alignment cross the C API. bindgen (libclang) must see __fp16 so it emits
   the same `__BindgenFloat16` it emits on Apple silicon; bf16 is a plain u16 there too. */
#if !defined(HAS_FLOAT16)
#define HAS_FLOAT16
#include <stdint.h>
#if defined(__clang__)
typedef __fp16 float16_t;
#else
typedef uint16_t float16_t;
#endif
#endif

#if !defined(HAS_BFLOAT16)
#define HAS_BFLOAT16
#include <stdint.h>
typedef uint16_t bfloat16_t;
#endif

#ifdef __cplusplus
}
#endif

#endif
