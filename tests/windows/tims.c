/* TIMS.exe: a small real Windows program for lanup's Wine tests, built
   with mingw-w64. It stands for the application lanup updates:
   - at start it writes "VERSION PID" to var\current (VERSION is the file
     of that name beside it, in the folder it runs from);
   - it owns a hidden top-level window and stops cleanly on WM_CLOSE (a
     close request), writing "VERSION PID" to var\closed;
   - when the file spawn-child is present it starts a copy of itself with
     --child, which has no window, writes its pid to var\child and runs
     until it is ended: only a job object stops it with its parent;
   - when VERSION says "broken" it exits 3 at once (a release that fails
     its health check). */
#include <windows.h>
#include <stdio.h>
#include <string.h>

static char version[64] = "unknown";

static void record(const char *file, const char *what) {
    char path[MAX_PATH];
    CreateDirectoryA("var", NULL);
    snprintf(path, sizeof path, "var\\%s", file);
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%s %lu\n", what, GetCurrentProcessId());
        fclose(f);
    }
}

static LRESULT CALLBACK on_message(HWND w, UINT msg, WPARAM wp, LPARAM lp) {
    if (msg == WM_CLOSE) {
        record("closed", version);
        DestroyWindow(w);
        return 0;
    }
    if (msg == WM_DESTROY) {
        PostQuitMessage(0);
        return 0;
    }
    return DefWindowProcA(w, msg, wp, lp);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--child") == 0) {
        record("child", "child");
        for (;;) Sleep(1000);
    }
    FILE *v = fopen("VERSION", "r");
    if (v) {
        if (fgets(version, sizeof version, v)) version[strcspn(version, "\r\n")] = 0;
        fclose(v);
    }
    if (strstr(version, "broken")) return 3;
    record("current", version);
    if (GetFileAttributesA("spawn-child") != INVALID_FILE_ATTRIBUTES) {
        char self[MAX_PATH], line[MAX_PATH + 16];
        GetModuleFileNameA(NULL, self, sizeof self);
        snprintf(line, sizeof line, "\"%s\" --child", self);
        STARTUPINFOA si = {sizeof si};
        PROCESS_INFORMATION pi;
        if (CreateProcessA(NULL, line, NULL, NULL, FALSE, 0, NULL, NULL, &si, &pi)) {
            CloseHandle(pi.hThread);
            CloseHandle(pi.hProcess);
        }
    }
    WNDCLASSA wc = {0};
    wc.lpfnWndProc = on_message;
    wc.hInstance = GetModuleHandleA(NULL);
    wc.lpszClassName = "TIMS";
    RegisterClassA(&wc);
    CreateWindowExA(0, "TIMS", "TIMS", WS_OVERLAPPEDWINDOW, 0, 0, 100, 100, NULL, NULL,
                    wc.hInstance, NULL);
    MSG msg;
    while (GetMessageA(&msg, NULL, 0, 0) > 0) {
        TranslateMessage(&msg);
        DispatchMessageA(&msg);
    }
    return 0;
}
