// Dense patch-text decoding launchers: cosine logits, and bilinear upsampling + (softmax) + argmax without a
// full-resolution [C, H, W] map. Host-only declarations: addresses and the stream are integers (common/launch.h).
// dtype codes as in pooling/vec.cuh (0 fp32, 1 fp16, 2 bf16). Every side length must be < 32768.
#pragma once

#include <cstdint>

namespace dinotxt_fast {
namespace dense {

// out [B, C, h, w] fp32 = cos(patches [B, h, w, D], text [C, D]); both with unit stride along D.
// inv_norms: fp32 workspace of B*h*w + C floats.
void patch_text_logits(std::uintptr_t patches, int patches_dtype, std::int64_t batch, std::int64_t height,
                       std::int64_t width, std::int64_t dim, std::int64_t p_stride_b, std::int64_t p_stride_h,
                       std::int64_t p_stride_w, std::uintptr_t text, int text_dtype, std::int64_t classes,
                       std::int64_t t_stride_c, std::uintptr_t inv_norms, std::uintptr_t out, std::uintptr_t stream);

// labels [B, H, W] int64 and scores [B, H, W] fp32 of logits [B, C, h, w] (any strides) resized to (H, W).
void upsample_argmax(std::uintptr_t logits, int dtype, std::int64_t batch, std::int64_t classes, std::int64_t height,
                     std::int64_t width, std::int64_t stride_b, std::int64_t stride_c, std::int64_t stride_h,
                     std::int64_t stride_w, std::int64_t out_height, std::int64_t out_width, bool softmax,
                     std::uintptr_t labels, std::uintptr_t scores, std::uintptr_t stream);

// Sliding-window decode of window logits [Nw, C, h, w] (any strides). table: int32 [Nw, 5] rows (y0, x0, y1, x1,
// offset) on the device, offsets into lse (fp32, total box area; written here when `softmax`). The host has
// checked that the boxes cover the canvas rows the final resize reads. labels [H, W] int64, scores [H, W] fp32.
void slide_decode(std::uintptr_t logits, int dtype, std::int64_t windows, std::int64_t classes, std::int64_t height,
                  std::int64_t width, std::int64_t stride_n, std::int64_t stride_c, std::int64_t stride_h,
                  std::int64_t stride_w, std::uintptr_t table, std::int64_t max_area, std::uintptr_t lse,
                  std::int64_t canvas_height, std::int64_t canvas_width, std::int64_t out_height,
                  std::int64_t out_width, bool softmax, std::uintptr_t labels, std::uintptr_t scores,
                  std::uintptr_t stream);

}  // namespace dense
}  // namespace dinotxt_fast
