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
     its health check);
   - with --service it is a Windows service (the SCM starts it with
     another working folder: it moves to the folder above its own), which
     reports running, and on the SCM's stop writes var\closed and stops;
     a broken one reports stopped with exit code 3. */
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

static SERVICE_STATUS_HANDLE service;

static void report(DWORD state, DWORD code) {
    SERVICE_STATUS st = {0};
    st.dwServiceType = SERVICE_WIN32_OWN_PROCESS;
    st.dwCurrentState = state;
    st.dwControlsAccepted = state == SERVICE_RUNNING ? SERVICE_ACCEPT_STOP : 0;
    st.dwWin32ExitCode = code ? ERROR_SERVICE_SPECIFIC_ERROR : NO_ERROR;
    st.dwServiceSpecificExitCode = code;
    SetServiceStatus(service, &st);
}

static DWORD WINAPI on_control(DWORD control, DWORD type, LPVOID data, LPVOID ctx) {
    if (control == SERVICE_CONTROL_STOP) {
        record("closed", version);
        report(SERVICE_STOPPED, 0);
        ExitProcess(0);
    }
    return NO_ERROR;
}

static void read_version(void) {
    FILE *v = fopen("VERSION", "r");
    if (v) {
        if (fgets(version, sizeof version, v)) version[strcspn(version, "\r\n")] = 0;
        fclose(v);
    }
}

static void WINAPI service_main(DWORD argc, LPSTR *argv) {
    char dir[MAX_PATH];
    GetModuleFileNameA(NULL, dir, sizeof dir);
    for (int up = 0; up < 2; up++) {
        char *slash = strrchr(dir, '\\');
        if (slash) *slash = 0;
    }
    SetCurrentDirectoryA(dir);
    service = RegisterServiceCtrlHandlerExA("", on_control, NULL);
    read_version();
    if (strstr(version, "broken")) {
        report(SERVICE_STOPPED, 3);
        return;
    }
    record("current", version);
    report(SERVICE_RUNNING, 0);
    for (;;) Sleep(1000);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--service") == 0) {
        SERVICE_TABLE_ENTRYA table[] = {{"", service_main}, {NULL, NULL}};
        return StartServiceCtrlDispatcherA(table) ? 0 : 1;
    }
    if (argc > 1 && strcmp(argv[1], "--child") == 0) {
        record("child", "child");
        for (;;) Sleep(1000);
    }
    read_version();
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
