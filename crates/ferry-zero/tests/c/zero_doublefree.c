/*
 * zero_doublefree.c - frees a tcache-sized chunk twice. glibc must still
 * detect it ("free(): double free detected in tcache 2", SIGABRT) with
 * ferry-zero loaded: the library never writes the tcache key word.
 * Build: gcc -O2 -o zero_doublefree zero_doublefree.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    char *volatile p = malloc(200);
    memset(p, 0x5A, 200);
    free(p);
    free(p);
    puts("double free not detected");
    return 0;
}
