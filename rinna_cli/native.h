/* What rinna-cli's C kernels share (rinna_cli/native.py builds them into one library). */
#include <stdint.h>
#include <string.h>

/* max |x| over n floats, compared as integers (a float's magnitude bits order as it does), which vectorizes
 * without -ffast-math */
static inline float absmax(const float *x, int n) {
    uint32_t top = 0;
    for (int k = 0; k < n; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, 4);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    float amax;
    memcpy(&amax, &top, 4);
    return amax;
}
